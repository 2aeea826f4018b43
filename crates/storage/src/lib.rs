//! tidewater's embedded storage engine.
//!
//! Architecture invariant: this crate knows nothing of queues' delivery rules, HTTP or
//! tokio. It stores logs of record batches and the durable facts about them (settled
//! offsets, retry history), and answers writes at the asked ack level.

pub mod error;
pub mod faults;
pub mod format;
pub mod fs;
pub mod journal;
pub mod ranges;
mod segment;
pub mod sim;
pub mod state;
mod store;

pub use error::{FormatError, MissingData, OpenError, ReadError, WriteError};
pub use faults::{Faults, FsOp};
pub use format::{BatchBuilder, NewRecord, Record};
pub use fs::{FileRef, Fs, FsFile, OpenHow, RealFs};
pub use ranges::RangeSet;
pub use state::{LogState, RetryInfo};
pub use store::{
    AckLevel, Completion, DurableListener, FatalListener, LogReader, Op, OpResult, RecoveredLog,
    Store, StoreOptions, disk_free_bytes,
};

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
