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
use tidewater_fuzz::mode;
use tidewater_kafka::codec::ready_batches;

/// Sets each batch's length to what is there (the last one takes the rest) and its CRC.
fn repair(buf: &mut [u8]) {
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

fuzz_target!(|data: &[u8]| {
    let Some((batch_mode, rest)) = mode(data) else {
        return;
    };
    if !batch_mode {
        let _ = tidewater_kafka::decode_request(Bytes::copy_from_slice(rest));
        return;
    }
    let mut buf = rest.to_vec();
    repair(&mut buf);
    if let Ok(batches) = ready_batches(&buf, 1 << 20) {
        for batch in batches {
            let again = check_kafka_batch(&batch.bytes).expect("a batch made ready checks");
            assert_eq!(again.compression(), 0, "a batch made ready is uncompressed");
            assert_eq!(again, batch.header);
            assert!(batch.bytes.len() <= (1 << 20) + KAFKA_HEADER_LEN);
        }
    }
});
