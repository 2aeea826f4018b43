use std::io;
use std::path::PathBuf;

/// Why bytes read from disk are not a valid unit (defined with the record format).
pub use tidewater_format::FormatError;

/// Errors of opening (recovering) a data directory.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("data directory {0} is in use by another tidewater process")]
    Locked(PathBuf),
    #[error(
        "{path}: corrupt data at byte {position}: {reason} (acknowledged data would be lost; refusing to start)"
    )]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: String,
    },
    /// The configuration asks for what the format cannot hold.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The checkpoint and journal say these messages exist; no file holds them.
    #[error(
        "acknowledged messages are missing from the data directory (refusing to start; `tidewater serve --repair-missing` (StoreOptions::repair_missing) drops them and reports what it dropped, see docs/storage-format.md): {}",
        .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    Missing(Vec<MissingData>),
}

/// Unsettled messages that the checkpoint and journal say a log holds and no file holds:
/// refused at open, or dropped by a repair (`StoreOptions::repair_missing`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingData {
    pub log_uid: u64,
    pub log_name: String,
    /// The file or directory where they should be.
    pub path: PathBuf,
    /// The unsettled offsets, ascending and disjoint.
    pub offsets: Vec<std::ops::Range<u64>>,
    /// What is missing, in words.
    pub detail: String,
}

impl MissingData {
    /// Number of messages.
    pub fn count(&self) -> u64 {
        self.offsets.iter().map(|r| r.end - r.start).sum()
    }
}

impl std::fmt::Display for MissingData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<String> = self
            .offsets
            .iter()
            .map(|r| format!("{}..{}", r.start, r.end))
            .collect();
        write!(
            f,
            "log '{}' (uid {}): {} unsettled messages at offsets {} ({}: {})",
            self.log_name,
            self.log_uid,
            self.count(),
            ranges.join(", "),
            self.path.display(),
            self.detail
        )
    }
}

impl OpenError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        OpenError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Errors of a write submitted to the store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// write(2) failed (typically ENOSPC); nothing of the request was kept.
    #[error("write failed, nothing was stored: {0}")]
    Io(String),
    /// A write failed with "no space left on device".
    #[error("the disk is full: nothing was stored")]
    NoSpace,
    /// An fsync failed earlier: the store refuses every write until restarted and recovered.
    #[error("the store is poisoned after a failed fsync; restart to recover from the journal")]
    Poisoned,
    /// Written to the journal, but the fdatasync that would make it durable failed: it may
    /// or may not be there after a restart. The store is poisoned.
    #[error(
        "written, but the journal's fdatasync failed: it may or may not be there after a restart (the store refuses writes until restarted)"
    )]
    SyncFailed,
    /// The writer's queue is full: retry shortly.
    #[error("the write queue is full")]
    Overloaded,
    #[error("unknown log {0}")]
    UnknownLog(u64),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the store is shutting down")]
    ShuttingDown,
}

impl WriteError {
    pub(crate) fn from_io(err: &io::Error) -> Self {
        if err.raw_os_error() == Some(libc::ENOSPC) || err.raw_os_error() == Some(libc::EDQUOT) {
            WriteError::NoSpace
        } else {
            WriteError::Io(err.to_string())
        }
    }
}

/// Errors of reading a log.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: corrupt batch at byte {position}: {reason}")]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: FormatError,
    },
    #[error("unknown log {0}")]
    UnknownLog(u64),
    /// No file holds these offsets, and they were not accepted as missing at open.
    #[error("{path}: offsets {}..{} are missing from the log's files", offsets.start, offsets.end)]
    Missing {
        path: PathBuf,
        offsets: std::ops::Range<u64>,
    },
}
