//! The Kafka listener's decoding (crates/kafka): a request frame as a client sends it
//! (header, then the body at its version, through the `kafka-protocol` crate's decoders
//! with their allocations bounded), and a produce's record set made ready for storage
//! (batches checked, compressed ones decompressed within a bound, the result checked
//! again). Neither may panic, hang or allocate without bound; what is taken must check.
//! First byte even: a request frame. Odd: a record set, each batch's length and CRC
//! repaired first.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tidewater_format::kafka::{KAFKA_HEADER_LEN, check_kafka_batch};
use tidewater_fuzz::{mode, repair_kafka_batches};
use tidewater_kafka::codec::ready_batches;

fuzz_target!(|data: &[u8]| {
    let Some((batch_mode, rest)) = mode(data) else {
        return;
    };
    if !batch_mode {
        let _ = tidewater_kafka::decode_request(Bytes::copy_from_slice(rest));
        return;
    }
    let mut buf = rest.to_vec();
    repair_kafka_batches(&mut buf);
    if let Ok(batches) = ready_batches(&buf, 1 << 20) {
        for batch in batches {
            let again = check_kafka_batch(&batch.bytes).expect("a batch made ready checks");
            assert_eq!(again.compression(), 0, "a batch made ready is uncompressed");
            assert_eq!(again, batch.header);
            assert!(batch.bytes.len() <= (1 << 20) + KAFKA_HEADER_LEN);
        }
    }
});
