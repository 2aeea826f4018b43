//! Batches are Kafka's, proved against an independent implementation of the format (the
//! `kafka-protocol` crate, generated from Kafka's own schemas): what tidewater builds, it
//! decodes record for record; what it builds, tidewater checks and reads.

use bytes::{Bytes, BytesMut};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, NO_PRODUCER_EPOCH, NO_PRODUCER_ID, Record, RecordBatchDecoder, RecordBatchEncoder,
    RecordEncodeOptions, TimestampType,
};
use tidewater_format::kafka::{
    KAFKA_HEADER_LEN, KafkaBatchBuilder, KafkaRecords, NewKafkaRecord, check_kafka_batch,
    split_kafka_batches, stamp_kafka_batch,
};

#[test]
fn batches_built_here_decode_with_kafka_protocol() {
    let mut builder = KafkaBatchBuilder::new();
    let headers: [(&[u8], Option<&[u8]>); 2] = [(b"trace", Some(b"abc")), (b"empty", None)];
    for i in 0..50i64 {
        let key = format!("key-{}", i % 7);
        let value = format!("value {i}");
        builder.push(&NewKafkaRecord {
            key: (i % 5 != 0).then_some(key.as_bytes()),
            value: (i % 9 != 0).then_some(value.as_bytes()),
            headers: if i % 2 == 0 { &headers } else { &[] },
            timestamp: 1_700_000_000_000 + i * 3 - (i % 4),
        });
    }
    let mut bytes = builder.finish();
    stamp_kafka_batch(&mut bytes, 1_000, None);
    let set = RecordBatchDecoder::decode(&mut Bytes::from(bytes.clone())).unwrap();
    assert_eq!(set.version, 2);
    assert_eq!(set.records.len(), 50);
    for (i, record) in set.records.iter().enumerate() {
        let i = i as i64;
        assert_eq!(record.offset, 1_000 + i);
        assert_eq!(record.timestamp, 1_700_000_000_000 + i * 3 - (i % 4));
        assert_eq!(record.timestamp_type, TimestampType::Creation);
        let key = format!("key-{}", i % 7);
        assert_eq!(
            record.key.as_deref(),
            (i % 5 != 0).then_some(key.as_bytes())
        );
        let value = format!("value {i}");
        assert_eq!(
            record.value.as_deref(),
            (i % 9 != 0).then_some(value.as_bytes())
        );
        assert_eq!(record.headers.len(), if i % 2 == 0 { 2 } else { 0 });
        if i % 2 == 0 {
            let trace = record
                .headers
                .get(&StrBytes::from_static_str("trace"))
                .unwrap();
            assert_eq!(trace.as_deref(), Some(&b"abc"[..]));
            let empty = record
                .headers
                .get(&StrBytes::from_static_str("empty"))
                .unwrap();
            assert!(empty.is_none());
        }
    }
}

#[test]
fn batches_built_by_kafka_protocol_check_and_read_here() {
    let records: Vec<Record> = (0..20i64)
        .map(|i| {
            let mut headers = kafka_protocol::indexmap::IndexMap::new();
            if i % 3 == 0 {
                headers.insert(
                    StrBytes::from_string(format!("h{i}")),
                    Some(Bytes::from(format!("v{i}"))),
                );
            }
            Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: 0,
                producer_id: NO_PRODUCER_ID,
                producer_epoch: NO_PRODUCER_EPOCH,
                timestamp_type: TimestampType::Creation,
                offset: 500 + i,
                sequence: -1,
                timestamp: 1_000 + i,
                key: (i % 4 != 0).then(|| Bytes::from(format!("k{i}"))),
                value: Some(Bytes::from(format!("payload {i}"))),
                headers,
            }
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .unwrap();
    // A record set: the encoder may cut it into several batches.
    let mut i = 0i64;
    for batch in split_kafka_batches(&buf) {
        let batch = batch.unwrap();
        let header = check_kafka_batch(batch).unwrap();
        assert_eq!(header.base_offset, 500 + i);
        for record in KafkaRecords::new(&batch[KAFKA_HEADER_LEN..]) {
            let record = record.unwrap();
            let offset = header.base_offset + record.offset_delta;
            let timestamp = header.base_timestamp + record.timestamp_delta;
            assert_eq!((offset, timestamp), (500 + i, 1_000 + i));
            assert_eq!(record.value, Some(format!("payload {i}").as_bytes()));
            let headers: Vec<_> = record.headers().collect::<Result<_, _>>().unwrap();
            assert_eq!(headers.len(), usize::from(i % 3 == 0));
            i += 1;
        }
    }
    assert_eq!(i, 20);
}
