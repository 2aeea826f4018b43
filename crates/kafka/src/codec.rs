//! Produced batches made ready for storage, without I/O: each batch of a Produce's record
//! set checked (length, magic, CRC), and a compressed one decompressed, within a bound, into
//! an uncompressed batch with the same header fields. Streams store uncompressed batches
//! (what their readers, compaction, subscriptions and the JSON API decode), as a Kafka
//! topic with `compression.type=uncompressed` does.

use std::io::Read;

use tidewater_storage::format::FormatError;
use tidewater_storage::format::kafka::{
    CONTROL, KAFKA_HEADER_LEN, KafkaBatchHeader, TRANSACTIONAL, check_kafka_batch,
    split_kafka_batches, uncompressed_kafka_batch,
};

/// Why a produced batch was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("not a valid Kafka v2 record batch: {0}")]
    Corrupt(FormatError),
    #[error("the batch is compressed with codec {0}, which Kafka does not define")]
    UnknownCodec(u8),
    #[error("the batch does not decompress ({codec}): {reason}")]
    Decompress { codec: &'static str, reason: String },
    #[error(
        "the produce's batches decompress to more than {max} bytes (max_uncompressed_produce_bytes)"
    )]
    TooLarge { max: usize },
    #[error("transactional and control batches are not supported (tidewater has no transactions)")]
    Transactional,
}

/// A batch ready to append: uncompressed, checked, as the producer built it otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyBatch {
    pub bytes: Vec<u8>,
    pub header: KafkaBatchHeader,
    /// It arrived compressed (its bytes were made here).
    pub compressed: bool,
}

/// The batches of a Produce's record set, each checked and uncompressed. Any bad batch
/// refuses the whole set (Kafka refuses a partition's records as one).
pub fn ready_batches(set: &[u8], max_uncompressed: usize) -> Result<Vec<ReadyBatch>, BatchError> {
    let mut out = Vec::new();
    for batch in split_kafka_batches(set) {
        out.push(ready_batch(
            batch.map_err(BatchError::Corrupt)?,
            max_uncompressed,
        )?);
    }
    if out.is_empty() {
        return Err(BatchError::Corrupt(FormatError::Truncated));
    }
    Ok(out)
}

/// One batch checked and, when compressed, decompressed (within `max_uncompressed` bytes of
/// records).
pub fn ready_batch(bytes: &[u8], max_uncompressed: usize) -> Result<ReadyBatch, BatchError> {
    let header = check_kafka_batch(bytes).map_err(BatchError::Corrupt)?;
    if header.attributes & (TRANSACTIONAL | CONTROL) != 0 {
        return Err(BatchError::Transactional);
    }
    let codec = header.compression();
    if codec == 0 {
        return Ok(ReadyBatch {
            bytes: bytes.to_vec(),
            header,
            compressed: false,
        });
    }
    let records = decompress(codec, &bytes[KAFKA_HEADER_LEN..], max_uncompressed)?;
    let bytes = uncompressed_kafka_batch(bytes, &records).map_err(BatchError::Corrupt)?;
    let header = check_kafka_batch(&bytes).map_err(BatchError::Corrupt)?;
    Ok(ReadyBatch {
        bytes,
        header,
        compressed: true,
    })
}

/// The name Kafka gives a codec.
pub fn codec_name(codec: u8) -> &'static str {
    match codec {
        0 => "none",
        1 => "gzip",
        2 => "snappy",
        3 => "lz4",
        4 => "zstd",
        _ => "unknown",
    }
}

/// Decompresses a batch's records (Kafka's codecs 1..=4), refusing more than `max` bytes
/// of output before producing them.
pub fn decompress(codec: u8, input: &[u8], max: usize) -> Result<Vec<u8>, BatchError> {
    let name = codec_name(codec);
    let failed = |e: std::io::Error| BatchError::Decompress {
        codec: name,
        reason: e.to_string(),
    };
    let mut out = Vec::new();
    let limit = max as u64 + 1;
    match codec {
        1 => {
            flate2::read::GzDecoder::new(input)
                .take(limit)
                .read_to_end(&mut out)
                .map_err(failed)?;
        }
        2 => return snappy(input, max),
        3 => {
            lz4_flex::frame::FrameDecoder::new(input)
                .take(limit)
                .read_to_end(&mut out)
                .map_err(failed)?;
        }
        4 => {
            let decoder = zstd::stream::read::Decoder::with_buffer(input).map_err(failed)?;
            decoder.take(limit).read_to_end(&mut out).map_err(failed)?;
        }
        other => return Err(BatchError::UnknownCodec(other)),
    }
    if out.len() > max {
        return Err(BatchError::TooLarge { max });
    }
    Ok(out)
}

/// xerial's snappy framing (what the Java client writes: a 16-byte magic, then blocks each
/// with a 4-byte length), or one raw snappy block (what some clients write). Each block's
/// decompressed length is read from it and checked against the bound before it is made.
fn snappy(input: &[u8], max: usize) -> Result<Vec<u8>, BatchError> {
    const MAGIC: &[u8; 8] = b"\x82SNAPPY\x00";
    let failed = |reason: String| BatchError::Decompress {
        codec: "snappy",
        reason,
    };
    let mut out = Vec::new();
    let block = |block: &[u8], out: &mut Vec<u8>| -> Result<(), BatchError> {
        let len = snap::raw::decompress_len(block).map_err(|e| failed(e.to_string()))?;
        if out.len().saturating_add(len) > max {
            return Err(BatchError::TooLarge { max });
        }
        let at = out.len();
        out.resize(at + len, 0);
        let n = snap::raw::Decoder::new()
            .decompress(block, &mut out[at..])
            .map_err(|e| failed(e.to_string()))?;
        out.truncate(at + n);
        Ok(())
    };
    if input.len() >= 16 && &input[..8] == MAGIC {
        let mut rest = &input[16..];
        while !rest.is_empty() {
            if rest.len() < 4 {
                return Err(failed("a block's length is cut short".into()));
            }
            let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let Some(data) = rest.get(4..4 + len) else {
                return Err(failed(format!("a block of {len} bytes is cut short")));
            };
            block(data, &mut out)?;
            rest = &rest[4 + len..];
        }
    } else {
        block(input, &mut out)?;
    }
    Ok(out)
}
