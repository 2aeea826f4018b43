//! Kafka record sets (crates/format/src/kafka.rs), as a produce carries them and a stream
//! partition stores them: batches back to back, each checked (length, magic, CRC, offset
//! fields, every record of an uncompressed batch), its records walked with their headers.
//! Whatever checks must rebuild (`KafkaBatchBuilder`) into a batch that checks and holds
//! the same records, and stamp (base offset, append time) into one that still checks;
//! compaction's rebuild (`rebuild_kafka_batch`: some records kept, the span widened, a
//! delete horizon set) must give a batch that checks and holds exactly the records kept, at
//! their offsets and times, or be refused when the span is wider than a batch can span.
//! First byte odd: each batch's length and CRC are repaired first.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidewater_format::FormatError;
use tidewater_format::kafka::{
    KAFKA_HEADER_LEN, KafkaBatchBuilder, KafkaRecords, MAX_KAFKA_BATCH_SPAN, NewKafkaRecord,
    batch_records, check_kafka_batch, rebuild_kafka_batch, split_kafka_batches, stamp_kafka_batch,
};
use tidewater_fuzz::{mode, repair_kafka_batches};

type Owned = (
    i64,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Vec<(Vec<u8>, Option<Vec<u8>>)>,
);

fuzz_target!(|data: &[u8]| {
    let Some((repair_mode, rest)) = mode(data) else {
        return;
    };
    let mut buf = rest.to_vec();
    if repair_mode {
        repair_kafka_batches(&mut buf);
    }
    for batch in split_kafka_batches(&buf) {
        let Ok(batch) = batch else { break };
        let Ok(header) = check_kafka_batch(batch) else {
            continue;
        };
        let mut copy = batch.to_vec();
        stamp_kafka_batch(&mut copy, 77, Some(1_234));
        let stamped = check_kafka_batch(&copy).expect("a stamped batch checks");
        assert_eq!((stamped.base_offset, stamped.max_timestamp), (77, 1_234));
        assert!(stamped.is_log_append_time());
        if header.compression() != 0 {
            continue;
        }
        // Compaction's rebuild: every other record (from a parity the data chooses) kept,
        // the span widened by 3 on each side, a delete horizon on odd batches.
        if let Ok(base) = u64::try_from(header.base_offset)
            && base >= 3
            && base < u64::MAX / 4
        {
            let parity = u64::from(batch.len() % 2 == 0);
            let before: Vec<(u64, i64, Option<Vec<u8>>, Option<Vec<u8>>)> =
                batch_records(batch, &header, base, 0)
                    .map(|r| {
                        let r = r.expect("a checked batch's records walk");
                        (
                            r.offset,
                            r.timestamp,
                            r.record.key.map(<[u8]>::to_vec),
                            r.record.value.map(<[u8]>::to_vec),
                        )
                    })
                    .collect();
            let span = (base - 3, base + header.offset_span() + 3);
            let horizon = (parity == 1).then_some(9_999);
            let rebuilt = rebuild_kafka_batch(batch, &header, base, span, horizon, &mut |r| {
                r.offset % 2 == parity
            });
            // Wider than a batch can span (lastOffsetDelta is an i32): refused, as it says.
            if span.1 - span.0 > MAX_KAFKA_BATCH_SPAN {
                assert!(
                    matches!(rebuilt, Err(FormatError::BadLength)),
                    "{rebuilt:?}"
                );
            } else {
                let rebuilt = rebuilt.expect("a checked batch rebuilds");
                let again = check_kafka_batch(&rebuilt).expect("a compacted batch checks");
                assert_eq!(again.offset_span(), span.1 - span.0);
                assert_eq!(again.delete_horizon(), horizon.or(header.delete_horizon()));
                let after: Vec<(u64, i64, Option<Vec<u8>>, Option<Vec<u8>>)> =
                    batch_records(&rebuilt, &again, span.0, 0)
                        .map(|r| {
                            let r = r.expect("a compacted batch's records walk");
                            (
                                r.offset,
                                r.timestamp,
                                r.record.key.map(<[u8]>::to_vec),
                                r.record.value.map(<[u8]>::to_vec),
                            )
                        })
                        .collect();
                let kept: Vec<_> = before.into_iter().filter(|r| r.0 % 2 == parity).collect();
                assert_eq!(after, kept, "the records kept, as they were");
            }
        }
        // Checked: every record parses. Rebuilt, the records are the same (offsets close up).
        let mut owned: Vec<Owned> = Vec::new();
        for record in KafkaRecords::new(&batch[KAFKA_HEADER_LEN..]) {
            let record = record.expect("a checked batch's records parse");
            let headers = record
                .headers()
                .map(|h| h.map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec))))
                .collect::<Result<Vec<_>, _>>()
                .expect("a checked record's headers parse");
            owned.push((
                header.base_timestamp.wrapping_add(record.timestamp_delta),
                record.key.map(<[u8]>::to_vec),
                record.value.map(<[u8]>::to_vec),
                headers,
            ));
        }
        let mut builder = KafkaBatchBuilder::new();
        for (timestamp, key, value, headers) in &owned {
            let headers: Vec<(&[u8], Option<&[u8]>)> = headers
                .iter()
                .map(|(k, v)| (&k[..], v.as_deref()))
                .collect();
            builder.push(&NewKafkaRecord {
                key: key.as_deref(),
                value: value.as_deref(),
                headers: &headers,
                timestamp: *timestamp,
            });
        }
        let rebuilt = builder.finish();
        let again = check_kafka_batch(&rebuilt).expect("a rebuilt batch checks");
        assert_eq!(again.records_count as usize, owned.len());
        for (record, (timestamp, key, value, _)) in
            KafkaRecords::new(&rebuilt[KAFKA_HEADER_LEN..]).zip(&owned)
        {
            let record = record.expect("rebuilt records parse");
            assert_eq!(
                again.base_timestamp.wrapping_add(record.timestamp_delta),
                *timestamp
            );
            assert_eq!(record.key, key.as_deref());
            assert_eq!(record.value, value.as_deref());
        }
    }
});
