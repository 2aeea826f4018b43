//! Stream records in and out, without I/O: a produce checked and cut into one Kafka batch
//! per partition, and stored batches decoded into records for the JSON API.

use bytes::Bytes;
use tidewater_storage::StoredBatch;
use tidewater_storage::format::MAX_BATCH_BODY;
use tidewater_storage::format::kafka::{
    BatchRecord, CONTROL, KAFKA_HEADER_LEN, KafkaBatchBuilder, KafkaRecords, NewKafkaRecord,
    TRANSACTIONAL, batch_records, check_kafka_batch, stamp_kafka_batch,
};

use super::config::{StreamConfig, TimestampType};
use super::partition::partition_for_key;
use crate::config::Limits;
use crate::error::{BrokerError, ErrorCode};

/// A record to produce.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewStreamRecord {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// Header names are text (Kafka's are strings); values are bytes or null.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The producer's time (ms since the epoch); the broker's when absent.
    pub timestamp: Option<i64>,
    /// A partition chosen by the producer; else by key, else one per produce.
    pub partition: Option<u32>,
}

/// A record as fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRecord {
    pub offset: u64,
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
}

/// The batch a produce appends to one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionBatch {
    pub partition: u32,
    /// A Kafka record batch (base offset 0: storage stamps it).
    pub kafka: Vec<u8>,
    pub count: u32,
}

/// Where each record of a produce went: its partition and its index in that partition's
/// batch (its offset is the batch's base offset plus the index).
pub type Placement = Vec<(u32, u32)>;

/// Checks a produce against the limits and cuts it into one batch per partition, records
/// in the order given. Keyless records without a partition all go to `sticky`.
pub fn plan_produce(
    records: &[NewStreamRecord],
    config: &StreamConfig,
    sticky: u32,
    limits: &Limits,
    now_ms: i64,
) -> Result<(Vec<PartitionBatch>, Placement), BrokerError> {
    if records.is_empty() {
        return Err(BrokerError::invalid("a produce needs at least one record"));
    }
    if records.len() > limits.max_batch_messages {
        return Err(BrokerError::new(
            ErrorCode::BatchTooLarge,
            format!(
                "{} records exceed max_batch_messages {}",
                records.len(),
                limits.max_batch_messages
            ),
        ));
    }
    let mut placement = Vec::with_capacity(records.len());
    let mut builders: Vec<(u32, KafkaBatchBuilder)> = Vec::new();
    for (idx, record) in records.iter().enumerate() {
        let headers: Vec<(&[u8], Option<&[u8]>)> = record
            .headers
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_deref()))
            .collect();
        check_fields(
            idx,
            record.key.as_deref(),
            record.value.as_deref(),
            &headers,
            record.timestamp,
            limits,
        )?;
        check_key(idx, record.key.as_deref(), config)?;
        let partition = match (record.partition, &record.key) {
            (Some(p), _) if p >= config.partitions => {
                return Err(BrokerError::new(
                    ErrorCode::PartitionNotFound,
                    format!(
                        "record {idx}: partition {p} does not exist (the stream has {})",
                        config.partitions
                    ),
                ));
            }
            (Some(p), _) => p,
            (None, Some(key)) => partition_for_key(key, config.partitions),
            (None, None) => sticky % config.partitions,
        };
        let at = match builders.iter().position(|(p, _)| *p == partition) {
            Some(at) => at,
            None => {
                builders.push((partition, KafkaBatchBuilder::new()));
                builders.len() - 1
            }
        };
        let builder = &mut builders[at].1;
        placement.push((partition, builder.len() as u32));
        builder.push(&NewKafkaRecord {
            key: record.key.as_deref(),
            value: record.value.as_deref(),
            headers: &headers,
            timestamp: record.timestamp.unwrap_or(now_ms),
        });
        if builder.encoded_len() > MAX_BATCH_BODY {
            return Err(BrokerError::new(
                ErrorCode::RequestTooLarge,
                format!("partition {partition}'s batch exceeds 256 MiB once encoded"),
            ));
        }
    }
    let mut batches = Vec::with_capacity(builders.len());
    for (partition, builder) in builders {
        let count = builder.len() as u32;
        let mut kafka = builder.finish();
        check_max_message_bytes(kafka.len(), config)?;
        if config.timestamp_type == TimestampType::LogAppendTime {
            stamp_kafka_batch(&mut kafka, 0, Some(now_ms));
        }
        batches.push(PartitionBatch {
            partition,
            kafka,
            count,
        });
    }
    Ok((batches, placement))
}

/// Checks one record's fields against the limits (both produce paths).
fn check_fields(
    idx: usize,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[(&[u8], Option<&[u8]>)],
    timestamp: Option<i64>,
    limits: &Limits,
) -> Result<(), BrokerError> {
    let bad = |what: String| {
        Err(BrokerError::new(
            ErrorCode::InvalidMessage,
            format!("record {idx}: {what}"),
        ))
    };
    let value_len = value.map_or(0, <[u8]>::len);
    if value_len > limits.max_message_bytes {
        return Err(BrokerError::new(
            ErrorCode::MessageTooLarge,
            format!(
                "record {idx}: value of {value_len} bytes exceeds max_message_bytes {}",
                limits.max_message_bytes
            ),
        ));
    }
    if let Some(key) = key
        && key.len() > limits.max_key_bytes
    {
        return bad(format!(
            "key of {} bytes exceeds max_key_bytes {}",
            key.len(),
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
        let value_len = value.map_or(0, <[u8]>::len);
        if name.is_empty()
            || name.len() > limits.max_header_bytes
            || value_len > limits.max_header_bytes
        {
            return bad(format!(
                "header names must be 1..={0} bytes and values at most {0} bytes",
                limits.max_header_bytes
            ));
        }
        if std::str::from_utf8(name).is_err() {
            return bad("header names must be UTF-8".into());
        }
    }
    if let Some(timestamp) = timestamp
        && timestamp < 0
    {
        return bad(format!(
            "timestamp {timestamp} is before 1970: give ms since the epoch, or none for the broker's time"
        ));
    }
    Ok(())
}

/// A compacted stream keeps the latest record per key: a record without one is refused
/// (as Kafka refuses it), not kept for ever nor dropped by the next compaction.
fn check_key(idx: usize, key: Option<&[u8]>, config: &StreamConfig) -> Result<(), BrokerError> {
    if key.is_none() && config.cleanup.compacts() {
        return Err(BrokerError::new(
            ErrorCode::InvalidMessage,
            format!(
                "record {idx} has no key: the stream is compacted (cleanup {}), which keeps the latest record per key, so every record needs one",
                serde_json::to_string(&config.cleanup).unwrap_or_default()
            ),
        ));
    }
    Ok(())
}

/// A batch a client built (the binary protocol's StreamProduce), checked whole and against
/// the limits: one uncompressed, non-transactional Kafka v2 batch of 1 or more records
/// with offset deltas 0, 1, 2, ... Its base offset is cleared (storage stamps it) and, on a
/// LogAppendTime stream, its timestamps become the broker's. Returns its record count.
pub fn plan_batch_produce(
    batch: &mut [u8],
    config: &StreamConfig,
    limits: &Limits,
    now_ms: i64,
) -> Result<u32, BrokerError> {
    let invalid = |what: String| BrokerError::new(ErrorCode::InvalidMessage, what);
    if batch.len() > MAX_BATCH_BODY {
        return Err(BrokerError::new(
            ErrorCode::RequestTooLarge,
            format!("a batch of {} bytes exceeds 256 MiB", batch.len()),
        ));
    }
    check_max_message_bytes(batch.len(), config)?;
    let header = check_kafka_batch(batch)
        .map_err(|e| invalid(format!("not a valid Kafka v2 record batch: {e}")))?;
    if header.compression() != 0 {
        return Err(invalid(format!(
            "the batch is compressed (codec {}): send uncompressed batches over this protocol",
            header.compression()
        )));
    }
    if header.attributes & (TRANSACTIONAL | CONTROL) != 0 {
        return Err(invalid(
            "transactional and control batches are not supported".into(),
        ));
    }
    let count = header.records_count;
    if count == 0 || i64::from(count) != i64::from(header.last_offset_delta) + 1 {
        return Err(invalid(format!(
            "a batch holds 1 or more records at offset deltas 0, 1, 2, ... (this one: {count} records, last offset delta {})",
            header.last_offset_delta
        )));
    }
    let count = count.unsigned_abs();
    if count as usize > limits.max_batch_messages {
        return Err(BrokerError::new(
            ErrorCode::BatchTooLarge,
            format!(
                "{count} records exceed max_batch_messages {}",
                limits.max_batch_messages
            ),
        ));
    }
    let log_append = config.timestamp_type == TimestampType::LogAppendTime;
    let mut headers = Vec::new();
    for (idx, record) in KafkaRecords::new(&batch[KAFKA_HEADER_LEN..]).enumerate() {
        let record = record.map_err(|e| invalid(format!("record {idx}: {e}")))?;
        headers.clear();
        for h in record.headers() {
            headers.push(h.map_err(|e| invalid(format!("record {idx}: header: {e}")))?);
        }
        let timestamp = (!log_append && !header.is_log_append_time())
            .then(|| header.base_timestamp.wrapping_add(record.timestamp_delta));
        check_fields(idx, record.key, record.value, &headers, timestamp, limits)?;
        check_key(idx, record.key, config)?;
    }
    stamp_kafka_batch(batch, 0, log_append.then_some(now_ms));
    Ok(count)
}

/// The largest batch a stream takes (the format's limit).
pub const MAX_STREAM_BATCH_BYTES: u64 = MAX_BATCH_BODY as u64;

/// Refuses a batch over the stream's `max_message_bytes`.
fn check_max_message_bytes(len: usize, config: &StreamConfig) -> Result<(), BrokerError> {
    if config.max_message_bytes > 0 && len as u64 > config.max_message_bytes {
        return Err(BrokerError::new(
            ErrorCode::MessageTooLarge,
            format!(
                "a batch of {len} bytes exceeds the stream's max_message_bytes {} (Kafka's max.message.bytes)",
                config.max_message_bytes
            ),
        ));
    }
    Ok(())
}

/// The records of a stored batch from offset `from` on. A compressed batch (written by a
/// Kafka producer) is not decoded here.
pub fn decode_batch(batch: &StoredBatch, from: u64) -> Result<Vec<StreamRecord>, BrokerError> {
    let header = check_kafka_batch(&batch.kafka).map_err(|e| {
        BrokerError::new(
            ErrorCode::Internal,
            format!(
                "a stored batch at offset {} is invalid: {e}",
                batch.base_offset
            ),
        )
    })?;
    if header.compression() != 0 {
        return Err(BrokerError::new(
            ErrorCode::InvalidRequest,
            format!(
                "the batch at offset {} is compressed (by a Kafka producer): fetch it over the binary protocol, which hands batches out as stored",
                batch.base_offset
            ),
        ));
    }
    let mut out = Vec::new();
    for found in batch_records(&batch.kafka, &header, batch.base_offset, from) {
        let BatchRecord {
            offset,
            timestamp,
            record,
        } = found.map_err(|e| {
            BrokerError::new(
                ErrorCode::Internal,
                format!(
                    "a stored record after offset {} is invalid: {e}",
                    batch.base_offset
                ),
            )
        })?;
        let headers = record
            .headers()
            .map(|h| {
                h.map(|(k, v)| {
                    (
                        String::from_utf8_lossy(k).into_owned(),
                        v.map(Bytes::copy_from_slice),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BrokerError::new(ErrorCode::Internal, e.to_string()))?;
        out.push(StreamRecord {
            offset,
            timestamp,
            key: record.key.map(Bytes::copy_from_slice),
            value: record.value.map(Bytes::copy_from_slice),
            headers,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(partitions: u32) -> StreamConfig {
        StreamConfig {
            partitions,
            timestamp_type: TimestampType::CreateTime,
            retention_ms: -1,
            retention_bytes: -1,

            ..StreamConfig::new(&Default::default(), &Default::default()).unwrap()
        }
    }

    fn keyed(key: &str) -> NewStreamRecord {
        NewStreamRecord {
            key: Some(key.as_bytes().to_vec()),
            value: Some(b"v".to_vec()),
            ..Default::default()
        }
    }

    #[test]
    fn a_produce_is_cut_by_partition_in_order() {
        let records = vec![
            keyed("foobar"),
            NewStreamRecord {
                value: Some(b"no key".to_vec()),
                ..Default::default()
            },
            NewStreamRecord {
                partition: Some(3),
                ..keyed("foobar")
            },
            keyed("foobar"),
        ];
        let (batches, placement) =
            plan_produce(&records, &config(50), 7, &Limits::default(), 1_000).unwrap();
        // foobar -> 16 (Kafka's partitioner), keyless -> the sticky partition.
        assert_eq!(placement, vec![(16, 0), (7, 0), (3, 0), (16, 1)]);
        let counts: Vec<(u32, u32)> = batches.iter().map(|b| (b.partition, b.count)).collect();
        assert_eq!(counts, vec![(16, 2), (7, 1), (3, 1)]);
        for batch in &batches {
            check_kafka_batch(&batch.kafka).unwrap();
        }
    }

    #[test]
    fn bad_records_are_refused_whole() {
        let limits = Limits::default();
        let cases = [
            (
                NewStreamRecord {
                    partition: Some(4),
                    ..keyed("k")
                },
                ErrorCode::PartitionNotFound,
            ),
            (
                NewStreamRecord {
                    value: Some(vec![0; limits.max_message_bytes + 1]),
                    ..Default::default()
                },
                ErrorCode::MessageTooLarge,
            ),
            (
                NewStreamRecord {
                    headers: vec![(String::new(), None)],
                    ..Default::default()
                },
                ErrorCode::InvalidMessage,
            ),
            (
                NewStreamRecord {
                    timestamp: Some(-5),
                    ..Default::default()
                },
                ErrorCode::InvalidMessage,
            ),
        ];
        for (record, code) in cases {
            let err = plan_produce(&[keyed("ok"), record], &config(4), 0, &limits, 0).unwrap_err();
            assert_eq!(err.code, code, "{err}");
            assert!(err.message.starts_with("record 1"), "{err}");
        }
        assert_eq!(
            plan_produce(&[], &config(1), 0, &limits, 0)
                .unwrap_err()
                .code,
            ErrorCode::InvalidRequest
        );
    }

    #[test]
    fn stored_batches_decode_from_an_offset_with_their_times() {
        let records: Vec<NewStreamRecord> = (0..5)
            .map(|i| NewStreamRecord {
                key: Some(format!("k{i}").into_bytes()),
                value: Some(format!("v{i}").into_bytes()),
                headers: vec![("h".into(), Some(b"x".to_vec()))],
                timestamp: Some(100 + i),
                partition: Some(0),
            })
            .collect();
        for (timestamp_type, expect) in [
            (TimestampType::CreateTime, vec![102, 103, 104]),
            (TimestampType::LogAppendTime, vec![9_000, 9_000, 9_000]),
        ] {
            let config = StreamConfig {
                timestamp_type,
                ..config(1)
            };
            let (mut batches, _) =
                plan_produce(&records, &config, 0, &Limits::default(), 9_000).unwrap();
            let mut kafka = batches.remove(0).kafka;
            stamp_kafka_batch(&mut kafka, 40, None);
            let stored = StoredBatch {
                base_offset: 40,
                span: 5,
                max_timestamp: 0,
                kafka: Bytes::from(kafka),
            };
            let got = decode_batch(&stored, 42).unwrap();
            let offsets: Vec<u64> = got.iter().map(|r| r.offset).collect();
            assert_eq!(offsets, vec![42, 43, 44]);
            let times: Vec<i64> = got.iter().map(|r| r.timestamp).collect();
            assert_eq!(times, expect);
            assert_eq!(got[0].value.as_deref(), Some(&b"v2"[..]));
            assert_eq!(
                got[0].headers,
                vec![("h".to_string(), Some(Bytes::from_static(b"x")))]
            );
        }
    }

    fn client_batch(records: &[NewKafkaRecord<'_>]) -> Vec<u8> {
        let mut builder = KafkaBatchBuilder::new();
        for r in records {
            builder.push(r);
        }
        builder.finish()
    }

    #[test]
    fn a_client_batch_is_checked_whole_and_stamped() {
        let limits = Limits::default();
        let value = |v: &'static [u8]| NewKafkaRecord {
            value: Some(v),
            timestamp: 7_000,
            ..Default::default()
        };
        let mut good = client_batch(&[value(b"a"), value(b"b")]);
        good[0..8].copy_from_slice(&99i64.to_be_bytes()); // a client's base offset is ignored
        // The CRC does not cover the base offset: still valid.
        assert_eq!(
            plan_batch_produce(&mut good, &config(1), &limits, 1_000),
            Ok(2)
        );
        assert_eq!(check_kafka_batch(&good).unwrap().base_offset, 0);

        let mut appended = client_batch(&[value(b"a")]);
        let log_append = StreamConfig {
            timestamp_type: TimestampType::LogAppendTime,
            ..config(1)
        };
        plan_batch_produce(&mut appended, &log_append, &limits, 1_234).unwrap();
        let header = check_kafka_batch(&appended).unwrap();
        assert!(header.is_log_append_time());
        assert_eq!(header.max_timestamp, 1_234);

        let big = vec![0u8; limits.max_message_bytes + 1];
        let non_utf8: &[(&[u8], Option<&[u8]>)] = &[(b"\xff\xfe", None)];
        let mut compressed = client_batch(&[value(b"a")]);
        compressed[22] |= 1; // gzip, CRC redone below
        let crc = crc32c::crc32c(&compressed[21..]);
        compressed[17..21].copy_from_slice(&crc.to_be_bytes());
        let cases: Vec<(Vec<u8>, ErrorCode)> = vec![
            (vec![1, 2, 3], ErrorCode::InvalidMessage),
            (client_batch(&[]), ErrorCode::InvalidMessage),
            (compressed, ErrorCode::InvalidMessage),
            (
                client_batch(&[NewKafkaRecord {
                    value: Some(&big),
                    ..Default::default()
                }]),
                ErrorCode::MessageTooLarge,
            ),
            (
                client_batch(&[NewKafkaRecord {
                    headers: non_utf8,
                    ..Default::default()
                }]),
                ErrorCode::InvalidMessage,
            ),
            (
                client_batch(&vec![value(b"x"); limits.max_batch_messages + 1]),
                ErrorCode::BatchTooLarge,
            ),
        ];
        for (i, (mut batch, code)) in cases.into_iter().enumerate() {
            let err = plan_batch_produce(&mut batch, &config(1), &limits, 0).unwrap_err();
            assert_eq!(err.code, code, "case {i}: {}", err.message);
        }
    }
}
