use std::io;
use std::path::PathBuf;

/// Why bytes read from disk are not a valid unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("truncated")]
    Truncated,
    #[error("bad magic byte")]
    BadMagic,
    #[error("unknown format version {0}")]
    UnknownVersion(u8),
    #[error("checksum mismatch")]
    BadChecksum,
    #[error("impossible length field")]
    BadLength,
    #[error("invalid UTF-8 in a name")]
    BadUtf8,
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
}

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
}
