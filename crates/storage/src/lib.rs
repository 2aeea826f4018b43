//! tidewater's embedded storage engine.
//!
//! Architecture invariant: this crate knows nothing of queues' delivery rules, HTTP or
//! tokio. It stores logs of record batches and the durable facts about them (settled
//! offsets, retry history), and answers writes at the asked ack level.

// A narrowing `as` cast silently cuts a length into a record that passes its CRC and cannot
// be read: every narrowing goes through `narrow` (checked) or `usize_of` (proven).
#![cfg_attr(not(test), deny(clippy::cast_possible_truncation))]

pub mod error;
pub mod faults;
pub mod fs;
pub mod journal;
mod open_files;
pub mod ranges;
mod segment;
pub use segment::StoredBatch;
pub mod sim;
pub mod state;
mod store;

pub use error::{FormatError, MissingData, OpenError, ReadError, WriteError};
pub use faults::{Faults, FsOp};
pub use fs::{FileRef, Fs, FsFile, OpenHow, RealFs};
pub use open_files::MIN_OPEN_SEGMENT_FILES;
pub use ranges::RangeSet;
pub use state::{LogState, RetryInfo};
pub use store::{
    AckLevel, Completion, DurableListener, FSYNC_BUCKETS, FatalListener, LatencySnapshot,
    LogReader, Op, OpResult, RecoveredLog, SegmentFiles, SegmentInfo, SegmentRewrite, Store,
    StoreOptions, disk_free_bytes,
};
/// The record and batch format, a crate of its own (the client speaks it without storage).
pub use tidewater_format as format;
pub use tidewater_format::{BatchBuilder, NewRecord, Record};

/// Entry points for the fuzz targets (`fuzz/`) that are private to this crate. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    use crate::{FormatError, LogState};

    /// Decodes a checkpoint file as recovery does: (next uid, logs).
    pub fn decode_checkpoint(bytes: &[u8]) -> Result<(u64, Vec<LogState>), FormatError> {
        crate::store::decode_checkpoint(bytes)
    }

    /// Encodes a checkpoint file as the writer thread does.
    pub fn encode_checkpoint(next_uid: u64, logs: &[&LogState]) -> Vec<u8> {
        crate::store::encode_checkpoint(next_uid, logs)
    }
}

/// A length or count into a narrower field of the format (checked; panics on a bug).
pub(crate) use tidewater_format::narrow;

// Offsets, sizes and file positions are u64; memory is indexed by usize: 64-bit only.
const _: () = assert!(usize::BITS >= u64::BITS);

/// A u64 that indexes memory (a size read from a file, a position in a buffer).
#[allow(clippy::cast_possible_truncation)] // proven by the assertion above
pub(crate) const fn usize_of(n: u64) -> usize {
    n as usize
}
