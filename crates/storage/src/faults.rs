//! A test seam: fault injection into the store's threads and file operations. Everything is
//! off by default; a check costs one relaxed atomic load, and only on rare paths (once per
//! writer round or sync, once per checkpoint).
//!
//! Tests keep an `Arc<Faults>`, pass it in `StoreOptions::faults` and arm faults while the
//! store runs.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Faults {
    /// The writer thread panics at the start of its next round.
    pub panic_writer: AtomicBool,
    /// The syncer thread panics before its next fdatasync.
    pub panic_syncer: AtomicBool,
    /// While set, the syncer waits before its next fdatasync: durable requests stay
    /// unanswered (tests of what a request does while its write is in flight).
    pub stall_syncer: AtomicBool,
    /// This many next opens of the checkpoint directory (for its fsync) fail with EMFILE.
    pub checkpoint_dir_open_failures: AtomicU64,
    /// The journal write of the Nth next meta request (create, config, delete) fails with
    /// ENOSPC (1 = the next one; 0 = off).
    pub fail_meta_write_at: AtomicU64,
    /// Record the file system operations whose durability matters in `fs_ops`.
    pub record_fs_ops: AtomicBool,
    pub fs_ops: Mutex<Vec<FsOp>>,
}

/// A file system operation, as recorded for tests of crash safety (names are only
/// durable once their directory is fsynced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsOp {
    CreateDir(PathBuf),
    CreateFile(PathBuf),
    Rename { from: PathBuf, to: PathBuf },
    Remove(PathBuf),
    SyncDir(PathBuf),
    SyncFile(PathBuf),
}

impl Faults {
    /// Whether `flag` is armed; disarms it (a fault fires once).
    pub(crate) fn take(flag: &AtomicBool) -> bool {
        flag.load(Ordering::Relaxed) && flag.swap(false, Ordering::SeqCst)
    }

    /// Records `op` when recording is on.
    pub(crate) fn note(&self, op: impl FnOnce() -> FsOp) {
        if self.record_fs_ops.load(Ordering::Relaxed) {
            self.fs_ops
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(op());
        }
    }

    /// Counts `at` down; true when it reaches zero now (the armed operation is this one).
    pub(crate) fn take_at(at: &AtomicU64) -> bool {
        at.load(Ordering::Relaxed) > 0
            && at
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok_and(|before| before == 1)
    }

    /// Counts `counter` down; true while it was above zero.
    pub(crate) fn take_count(counter: &AtomicU64) -> bool {
        counter.load(Ordering::Relaxed) > 0
            && counter
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
    }
}
