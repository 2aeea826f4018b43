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
