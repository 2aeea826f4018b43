//! Binary protocol frames: `decode_frame` on arbitrary bytes (pipelined, as a connection's
//! read buffer), under the server's default limit and the 4 KiB limit before `Hello`.
//! Every decoded frame must re-encode to bytes that decode to the same frame; a Deliver
//! frame must encode the same through `DeliverWriter`, a Fetched frame through
//! `FetchedWriter` (and its record sets through the client's Kafka batch decoding); prefixes of a whole frame are
//! "incomplete", never an error. The payloads the server and client decode next (a
//! Produce batch, a delivered record, receipts) go through their decoders too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidewater_core::receipt::Receipt;
use tidewater_format::kafka::{
    KAFKA_HEADER_LEN, KafkaRecords, check_kafka_batch, split_kafka_batches,
};
use tidewater_format::{
    BATCH_HEADER_LEN, FormatError, decode_record, restamp_batch, visit_records,
};
use tidewater_proto::{DEFAULT_MAX_FRAME, DeliverWriter, FetchedWriter, Frame, decode_frame};

fn check_frame(frame: &Frame, request_id: u32, max: usize) {
    let mut out = Vec::new();
    frame.encode(request_id, &mut out);
    let again = decode_frame(&out, max.max(out.len()));
    assert_eq!(
        again,
        Ok(Some((frame.clone(), request_id, out.len()))),
        "re-encoded frame does not decode to itself"
    );
    // Every proper prefix of a whole frame is incomplete (the reader waits for more).
    for cut in [0, 3, 4, 9, out.len() / 2, out.len() - 1] {
        if cut < out.len() {
            assert_eq!(
                decode_frame(&out[..cut], max.max(out.len())),
                Ok(None),
                "prefix {cut}"
            );
        }
    }
    match frame {
        Frame::Deliver { deliveries } => {
            let mut writer = DeliverWriter::new(request_id, 0);
            for d in deliveries {
                writer.push(
                    &d.receipt,
                    d.delivery_count,
                    d.offset,
                    d.published_at_ms,
                    |b| b.extend_from_slice(&d.record),
                );
                // What the client does with each delivery.
                if let Ok(record) = decode_record(&d.record, d.offset, d.published_at_ms) {
                    let mut wire = Vec::new();
                    record.encode(&mut wire);
                    assert_eq!(wire.len(), record.encoded_len());
                }
            }
            assert_eq!(
                writer.finish(),
                out,
                "DeliverWriter differs from Frame::Deliver"
            );
        }
        Frame::Produce { batch, .. } => {
            // What the broker does with a produce: restamp the header, walk the records.
            let mut batch = batch.clone();
            if let Ok(header) = restamp_batch(&mut batch, 7, 1_000) {
                let _ = visit_records::<FormatError>(&header, &batch[BATCH_HEADER_LEN..], |v| {
                    let _ = v.headers().count();
                    let _ = v.size();
                    Ok(())
                });
            }
        }
        Frame::Fetched { partitions } => {
            let mut writer = FetchedWriter::new(request_id, 0);
            for p in partitions {
                if p.code.is_empty() && p.message.is_empty() {
                    writer.push(
                        &p.stream,
                        p.partition,
                        p.start_offset,
                        p.end_offset,
                        &[&p.records[..]],
                    );
                } else if p.start_offset == 0 && p.end_offset == 0 && p.records.is_empty() {
                    writer.push_error(&p.stream, p.partition, &p.code, &p.message);
                } else {
                    return; // not a shape the server writes
                }
                // What the client does with a fetched record set.
                for batch in split_kafka_batches(&p.records).flatten() {
                    if let Ok(header) = check_kafka_batch(batch)
                        && header.compression() == 0
                    {
                        for record in KafkaRecords::new(&batch[KAFKA_HEADER_LEN..]).flatten() {
                            let _ = record.headers().count();
                        }
                    }
                }
            }
            assert_eq!(
                writer.finish(),
                out,
                "FetchedWriter differs from Frame::Fetched"
            );
        }
        Frame::StreamProduce { batch, .. } => {
            let _ = check_kafka_batch(batch);
        }
        Frame::Ack { receipts, .. }
        | Frame::Nack { receipts, .. }
        | Frame::Extend { receipts, .. } => {
            assert_eq!(receipts.iter().len(), receipts.len());
            for (i, r) in receipts.iter().enumerate() {
                assert_eq!(receipts.get(i), Some(r));
                let _ = Receipt::decode(r);
            }
        }
        _ => {}
    }
}

fn run(data: &[u8], max: usize) {
    let mut at = 0;
    // A connection's read loop: decode frames one after another until one is incomplete.
    while at <= data.len() {
        match decode_frame(&data[at..], max) {
            Ok(Some((frame, request_id, used))) => {
                assert!(used >= 4 + 6 && used <= data.len() - at, "used {used}");
                check_frame(&frame, request_id, max);
                at += used;
            }
            Ok(None) | Err(_) => break,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    run(data, DEFAULT_MAX_FRAME);
    run(data, 4096);
});
