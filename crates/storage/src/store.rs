//! The store: one data directory, one writer thread, one syncer thread.
//!
//! Write path: callers `submit` a request (a list of ops) with an ack level. The writer
//! thread drains many requests, stages their journal entries in one buffer, writes it with
//! one `pwrite`, writes the same batches through to each log's active segment (page cache
//! only), applies the durable state, then answers `written` requests. The syncer runs one
//! `fdatasync` of the journal covering everything written while the previous one ran (group
//! commit), then answers `durable` requests and publishes each log's durable end.
//!
//! Segments are made durable lazily by checkpoints: fsync the segments written since the
//! last checkpoint, write a snapshot of every log's state, start a new journal file and drop
//! the old ones. Recovery = last checkpoint + replay of the journals after it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{FormatError, MissingData, OpenError, ReadError, WriteError};
use crate::faults::{Faults, FsOp};
use crate::format::{
    BatchHeader, Cursor, Record, RecordView, check_batch, decode_record, stamp_batch, view_record,
};
use crate::fs::{FileRef, Fs, Io, LockGuard, OpenHow, RealFs};
use crate::journal::{
    Entry, JOURNAL_HEADER_LEN, JOURNAL_MAGIC, Unit, UnitError, begin_group, decode_unit,
    encode_entry, finish_group, journal_header,
};
use crate::open_files::{MIN_OPEN_SEGMENT_FILES, OpenFiles};
use crate::segment::{
    Gap, LogFiles, Opened, Segment, SegmentWriter, Sink, StoredBatch, find_time, fsync_dir,
    read_batches, read_records,
};
use crate::state::LogState;

/// Version 02 added remembered message ids per log.
/// Version 03 has the payload of 02; it says that the journals after it may hold groups
/// (journal entry kind 8), so that a binary that knows only 02 refuses to start ("bad
/// magic") rather than cut the last journal at the first group as if it were torn. Both
/// are read.
/// Written when some log is a view (its payload has each log's `source`); an older binary
/// refuses it ("bad magic") rather than misread it.
const CHECKPOINT_MAGIC_04: &[u8; 8] = b"TWCKPT04";
const CHECKPOINT_MAGIC: &[u8; 8] = b"TWCKPT03";
const CHECKPOINT_MAGIC_02: &[u8; 8] = b"TWCKPT02";

/// When the store answers a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckLevel {
    /// After write(2): survives a killed process, not a power loss.
    Written,
    /// After fdatasync: survives a power loss.
    Durable,
}

#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// fdatasync for real. Only tests that do not test durability turn this off.
    pub fsync: bool,
    /// Roll the journal (and checkpoint) once it holds this many bytes.
    pub journal_roll_bytes: u64,
    /// Start a new segment once the active one holds this many bytes.
    pub segment_roll_bytes: u64,
    /// Or once a batch comes this much later (its publish time; a stream batch's largest
    /// timestamp) than the active segment's oldest (Kafka's segment.ms): retention by age
    /// deletes whole sealed segments, so a segment must not hold data for ever. 0: never.
    pub segment_roll_ms: u64,
    /// Checkpoint at least this often while anything changed.
    pub checkpoint_interval: Duration,
    /// Requests waiting for the writer; a full queue refuses with `WriteError::Overloaded`.
    pub write_queue_capacity: usize,
    /// Bytes staged per writer round (one larger request is written alone).
    pub max_round_bytes: usize,
    /// Fault injection for tests: the journal fsync number N (1-based) fails with EIO.
    pub fail_fsync_at: Option<u64>,
    /// Fault injection for tests (nothing armed by default).
    pub faults: Arc<Faults>,
    /// The file system (chosen once, at open): the real one by default, a simulated disk
    /// (`crate::sim::SimFs`) in power-loss tests.
    pub fs: Arc<dyn Fs>,
    /// For simulations: one request per writer round, and the next round only once the
    /// syncer's fdatasync of this one returned, so that requests submitted concurrently
    /// (the broker submits some without waiting) cannot change the order or the number of
    /// file operations. No group commit: never for production.
    pub lockstep: bool,
    /// Repair on open: when the checkpoint and journal say a log holds unsettled messages
    /// that no file holds (a lost directory or segment file, a cut segment), settle them
    /// (drop them) and report what was dropped (`Store::repair_report`) instead of refusing
    /// to start with `OpenError::Missing`. An operator's choice, never a default.
    pub repair_missing: bool,
    /// Segment files held open at most (least recently used closed first; see
    /// `open_files.rs`). At least `MIN_OPEN_SEGMENT_FILES`.
    pub max_open_segment_files: usize,
    /// Bytes the in-memory segment indexes (offset and time marks, one per
    /// `INDEX_INTERVAL_BYTES` of data) may take across all logs. Past it, each checkpoint
    /// halves the indexes of the most indexed sealed segments until they fit: memory stays
    /// bounded however much data is kept, and a lookup in a thinned segment reads on from
    /// an earlier mark. Active segments index in full.
    pub max_index_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            fsync: true,
            journal_roll_bytes: 64 << 20,
            segment_roll_bytes: 64 << 20,
            segment_roll_ms: 7 * 86_400_000,
            checkpoint_interval: Duration::from_secs(30),
            write_queue_capacity: 16_384,
            max_round_bytes: 4 << 20,
            fail_fsync_at: None,
            faults: Arc::new(Faults::default()),
            fs: Arc::new(RealFs),
            lockstep: false,
            repair_missing: false,
            max_open_segment_files: 2048,
            max_index_bytes: 64 << 20,
        }
    }
}

/// One change, as submitted.
#[derive(Debug, Clone)]
pub enum Op {
    CreateLog {
        name: String,
        config: String,
        /// The id window (window_ms, max ids), journaled with the create in one write:
        /// the log never exists without it.
        id_window: Option<(u64, u32)>,
    },
    UpdateConfig {
        uid: u64,
        config: String,
    },
    /// A view of log `source` (an existing log, or one created earlier in the same
    /// request, by its uid): a log with no files whose offsets are the source's, for
    /// delivery state over the source's records (`Settle`, `Retry`; never `Append`). Its
    /// end follows the source's; offsets below `floor` (clamped to the source's end) are
    /// settled from the start, and so are the offsets the source has settled. A source with views cannot be deleted before them.
    CreateView {
        name: String,
        source: u64,
        floor: u64,
    },
    DeleteLog {
        uid: u64,
    },
    /// Remember client-chosen ids appended to this log for `window_ms` (at most `max`),
    /// in its durable state: deduplication that survives a restart. 0 = forget them.
    IdWindow {
        uid: u64,
        window_ms: u64,
        max: u32,
    },
    /// An encoded batch (see `BatchBuilder`); the writer stamps its base offset.
    Append {
        uid: u64,
        batch: Vec<u8>,
    },
    Settle {
        uid: u64,
        ranges: Vec<Range<u64>>,
    },
    Retry {
        uid: u64,
        offset: u64,
        deliver_at_ms: i64,
        delivery_count: u32,
        at_ms: i64,
        error: String,
    },
}

impl Op {
    fn is_meta(&self) -> bool {
        matches!(
            self,
            Op::CreateLog { .. }
                | Op::CreateView { .. }
                | Op::UpdateConfig { .. }
                | Op::DeleteLog { .. }
                | Op::IdWindow { .. }
        )
    }
}

/// What one op did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    Created { uid: u64 },
    Appended { base_offset: u64, count: u32 },
    Done,
}

pub type Completion = Box<dyn FnOnce(Result<Vec<OpResult>, WriteError>) + Send>;
/// Called by the syncer with (log uid, durable end) after each group commit.
pub type DurableListener = Arc<dyn Fn(&[(u64, u64)]) + Send + Sync>;
/// Called once when the store poisons itself (a failed fsync, a dead storage thread).
pub type FatalListener = Arc<dyn Fn(&str) + Send + Sync>;

struct Request {
    ops: Vec<Op>,
    level: AckLevel,
    done: Completion,
}

enum Command {
    Write(Request),
    /// Checkpoint now (after what is queued before it) and answer.
    Checkpoint(std::sync::mpsc::Sender<Result<(), WriteError>>),
    /// Answer once everything queued before it is written (`Store::wait_idle`).
    Barrier(std::sync::mpsc::Sender<()>),
    Shutdown(std::sync::mpsc::Sender<()>),
    /// Put a rewritten segment in the place of the sealed ones it stands for (compaction);
    /// answers the log's directory and the other files it replaced, or `None` when it did
    /// not take their place.
    Replace {
        uid: u64,
        segment: Segment,
        reply: std::sync::mpsc::Sender<Result<Option<Replaced>, WriteError>>,
    },
}

/// A rewritten segment in place: its log's directory, and the other files of the run it
/// replaced (removed by the caller once the rename is durable).
type Replaced = (PathBuf, Vec<PathBuf>);

/// The cache of open segment files (`Store::segment_files`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentFiles {
    /// Files held open now (at most `capacity`; files in use by a reader or the writer
    /// when they left the cache stay open until that use ends).
    pub open: u64,
    pub capacity: u64,
    /// Files opened (created, or reopened after leaving the cache) since the store opened.
    pub opened: u64,
    /// Files that left the cache (least recently used, or their segment removed).
    pub closed: u64,
}

/// A recovered log, handed to the layer above on open.
pub use crate::state::LogState as RecoveredLog;

struct LogShared {
    files: RwLock<LogFiles>,
    durable_end: AtomicU64,
    /// The log's end in the newest durable checkpoint: recovery never cuts segments below
    /// it (the journal does not replay them), so only those may be rewritten.
    checkpointed_end: AtomicU64,
    /// Bytes read from segment files by readers (metrics; tests of read amplification).
    bytes_read: AtomicU64,
    /// This log's own segment roll size and age (0: the store's), set by the layer above
    /// from the log's configuration (`Store::set_segment_roll`); not durable.
    roll_bytes: AtomicU64,
    roll_ms: AtomicU64,
}

struct SyncState {
    journal: FileRef,
    written_seq: u64,
    synced_seq: u64,
    /// Synced and published: durable ends applied and completions run (what
    /// `Store::wait_synced` waits for, so a read after it sees what was synced).
    applied_seq: u64,
    /// Durable requests waiting for a sync: (seq, completion, results).
    pending: VecDeque<(u64, Completion, Vec<OpResult>)>,
    /// Log ends to publish once synced: (seq, uid, end).
    ends: VecDeque<(u64, u64, u64)>,
    stop: bool,
    /// The syncer thread died: durable requests are refused instead of queued.
    syncer_dead: bool,
}

struct Shared {
    dir: PathBuf,
    opts: StoreOptions,
    logs: RwLock<HashMap<u64, Arc<LogShared>>>,
    poisoned: AtomicBool,
    sync: Mutex<SyncState>,
    sync_cv: Condvar,
    listener: OnceLock<DurableListener>,
    fatal: OnceLock<FatalListener>,
    /// Why the store is poisoned (set once, with `poisoned`).
    poison_reason: Mutex<Option<String>>,
    /// The fatal listener ran (it runs once, whichever of poison and listener came first).
    fatal_fired: AtomicBool,
    /// Bytes in the journal and segments, for metrics and the disk watermark.
    journal_bytes: AtomicU64,
    /// Checkpoints that failed without poisoning (retried later), for metrics.
    checkpoint_failures: AtomicU64,
    /// How long the journal's fsyncs took (metrics).
    fsync_latency: FsyncLatency,
    /// The segment files held open.
    open_files: Arc<OpenFiles>,
    /// Bytes of the segment indexes after the last checkpoint's bounding, and index
    /// halvings done (metrics).
    index_bytes: AtomicU64,
    index_thinnings: AtomicU64,
}

impl Shared {
    /// Waits until everything written so far went through the syncer (or it stopped, or
    /// the store is poisoned).
    fn wait_synced(&self) {
        let mut sync = self.sync.lock().unwrap_or_else(|e| e.into_inner());
        let target = sync.written_seq;
        while sync.applied_seq < target && !sync.stop && !self.poisoned.load(Ordering::SeqCst) {
            sync = self.sync_cv.wait(sync).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn io(&self) -> Io {
        Io {
            fs: self.opts.fs.clone(),
            faults: self.opts.faults.clone(),
            files: self.open_files.clone(),
        }
    }

    fn poison(&self, what: &str) {
        // The reason is in place before the flag: whoever sees the store poisoned can say why.
        let mut reason = self.poison_reason.lock().unwrap_or_else(|e| e.into_inner());
        if reason.is_some() {
            return;
        }
        *reason = Some(what.into());
        drop(reason);
        self.poisoned.store(true, Ordering::SeqCst);
        tracing::error!("{what}; the store refuses every write from now on");
        self.fire_fatal();
    }

    /// Runs the fatal listener once the store is poisoned and a listener is set (the store
    /// may poison itself before the server has set its listener).
    fn fire_fatal(&self) {
        let Some(fatal) = self.fatal.get() else {
            return;
        };
        let Some(reason) = self
            .poison_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return;
        };
        if !self.fatal_fired.swap(true, Ordering::SeqCst) {
            fatal(&reason);
        }
    }

    /// A storage thread died: poison the store (readiness fails, the fatal listener ends
    /// the process) and answer every durable request waiting for a sync that will not come.
    fn thread_died(&self, thread: &str, panic: &(dyn std::any::Any + Send)) {
        let message = panic
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        self.poison(&format!("the storage {thread} thread panicked: {message}"));
        let pending: Vec<_> = {
            let mut sync = self.sync.lock().unwrap_or_else(|e| e.into_inner());
            sync.stop = true;
            if thread == "syncer" {
                sync.syncer_dead = true;
            }
            self.sync_cv.notify_all();
            if thread == "syncer" {
                sync.pending.drain(..).collect()
            } else {
                Vec::new() // the syncer answers them (refused: the store is poisoned)
            }
        };
        for (_, done, _) in pending {
            done(Err(WriteError::Poisoned));
        }
    }
}

/// Runs a storage thread's body; its death by panic poisons the store.
fn guarded(shared: &Shared, thread: &str, body: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        shared.thread_died(thread, panic.as_ref());
    }
}

/// An open data directory.
pub struct Store {
    shared: Arc<Shared>,
    tx: SyncSender<Command>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    repair_report: Vec<MissingData>,
    /// Held until `shutdown` has stopped the threads (not until the last handle goes: a
    /// completion may keep one a while, and the directory must be free to reopen at once).
    lock: Mutex<Option<LockGuard>>,
}

/// Reads one log's records; cheap to clone.
#[derive(Clone)]
pub struct LogReader {
    log: Arc<LogShared>,
}

/// A rewrite of sealed segments under way (`Store::rewrite_segments`). Dropped without
/// `Store::replace_segments`, its file is removed.
pub struct SegmentRewrite {
    uid: u64,
    writer: Option<SegmentWriter>,
    io: Io,
    fsync: bool,
}

impl SegmentRewrite {
    /// Adds a Kafka batch that starts where the rewrite so far ends (its first batch,
    /// where the first segment replaced starts).
    pub fn push(&mut self, kafka_batch: &[u8]) -> Result<(), WriteError> {
        let writer = self.writer.as_mut().expect("not yet replaced");
        writer.push(kafka_batch).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidInput => WriteError::Invalid(e.to_string()),
            _ => WriteError::from_io(&e),
        })
    }

    /// The offset after the last batch pushed.
    pub fn end(&self) -> u64 {
        self.writer.as_ref().map_or(0, |w| w.segment.end)
    }

    /// Bytes pushed so far (headers included).
    pub fn bytes(&self) -> u64 {
        self.writer.as_ref().map_or(0, |w| w.segment.len)
    }
}

impl Drop for SegmentRewrite {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            writer.discard();
        }
    }
}

/// Removes a rewritten segment's file that will not take anyone's place.
/// Removes the directories of logs a refused meta request had created.
fn discard_created(fs: &Arc<dyn Fs>, created: Vec<(LogState, Option<LogFiles>)>) {
    for files in created.into_iter().filter_map(|(_, files)| files) {
        let _ = fs.remove_dir_all(&files.dir);
    }
}

fn discard_rewrite(io: &Io, segment: Segment) {
    let path = segment.path.clone();
    drop(segment);
    let _ = io.fs.remove_file(&path);
}

/// A read sink that decodes each record into `out`.
fn decode_into(
    out: &mut Vec<Record>,
) -> impl FnMut(&[u8], u64, i64) -> Result<bool, FormatError> + '_ {
    |bytes, offset, published_at_ms| {
        out.push(decode_record(bytes, offset, published_at_ms)?);
        Ok(true)
    }
}

/// One segment of a log, as retention sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    pub base: u64,
    /// The offset after its last record.
    pub end: u64,
    pub bytes: u64,
    /// The largest batch timestamp in it (stream segments; `i64::MIN` when none).
    pub max_timestamp: i64,
}

impl LogReader {
    /// The log's segments, oldest first; the last one is the active segment (appends go
    /// there, and it is never removed).
    pub fn segments(&self) -> Vec<SegmentInfo> {
        let files = self.log.files.read().unwrap_or_else(|e| e.into_inner());
        files
            .segments
            .iter()
            .map(|s| SegmentInfo {
                base: s.base,
                end: s.end,
                bytes: s.len,
                max_timestamp: s.max_timestamp(),
            })
            .collect()
    }

    /// Offsets below this are durable and may be delivered.
    pub fn durable_end(&self) -> u64 {
        self.log.durable_end.load(Ordering::Acquire)
    }

    /// The log's end in the newest durable checkpoint: sealed segments below it may be
    /// rewritten (`Store::rewrite_segments`).
    pub fn checkpointed_end(&self) -> u64 {
        self.log.checkpointed_end.load(Ordering::Acquire)
    }

    /// Durable stream batches (Kafka record batches, as stored) from the one holding
    /// `from` on, about `max_bytes` of them (at least one when one is durable).
    pub fn read_batches(&self, from: u64, max_bytes: usize) -> Result<Vec<StoredBatch>, ReadError> {
        let mut out = Vec::new();
        let read = read_batches(
            &self.log.files,
            from,
            self.durable_end(),
            max_bytes,
            &mut out,
        )?;
        self.log.bytes_read.fetch_add(read, Ordering::Relaxed);
        Ok(out)
    }

    /// The base offset of the first durable stream batch whose max timestamp is at least
    /// `timestamp` (the first offset at or after that time is in it), or `None`.
    pub fn find_time(&self, timestamp: i64) -> Result<Option<u64>, ReadError> {
        let found = find_time(&self.log.files, timestamp)?;
        Ok(found.filter(|&offset| offset < self.durable_end()))
    }

    /// Reads durable records from `from` on: at most `max_count` records and about
    /// `max_bytes` of them. Offsets deleted by retention are skipped.
    pub fn read(
        &self,
        from: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, ReadError> {
        let mut out = Vec::new();
        self.read_records(
            from,
            self.durable_end(),
            (max_count, max_bytes),
            &|_| true,
            &mut decode_into(&mut out),
        )?;
        Ok(out)
    }

    /// Shows `visit` the durable records from `from` on, at most `max_count`, as views
    /// borrowed from the read buffer (nothing is allocated per record), until it returns
    /// false. For scans that only look at a record's metadata.
    pub fn scan(
        &self,
        from: u64,
        max_count: usize,
        visit: &mut dyn FnMut(&RecordView<'_>) -> bool,
    ) -> Result<(), ReadError> {
        self.read_records(
            from,
            self.durable_end(),
            (max_count, usize::MAX),
            &|_| true,
            &mut |bytes: &[u8], offset, _| Ok(visit(&view_record(bytes, offset)?)),
        )
    }

    /// Reads the durable records in `from..end` whose offset `want` accepts, decoding
    /// only those (for scattered picks: one pass instead of a read per record).
    pub fn read_where(
        &self,
        from: u64,
        end: u64,
        want: &dyn Fn(u64) -> bool,
    ) -> Result<Vec<Record>, ReadError> {
        let mut out = Vec::new();
        self.read_records(
            from,
            end.min(self.durable_end()),
            (usize::MAX, usize::MAX),
            want,
            &mut decode_into(&mut out),
        )?;
        Ok(out)
    }

    /// `segment::read_records` on this log, counting the bytes it read.
    fn read_records(
        &self,
        from: u64,
        limit: u64,
        (max_count, max_bytes): (usize, usize),
        want: &dyn Fn(u64) -> bool,
        sink: Sink<'_>,
    ) -> Result<(), ReadError> {
        let read = read_records(
            &self.log.files,
            from,
            limit,
            max_count,
            max_bytes,
            want,
            sink,
        )?;
        self.log.bytes_read.fetch_add(read, Ordering::Relaxed);
        Ok(())
    }

    /// Bytes read from this log's segment files so far, by every reader of it.
    pub fn bytes_read(&self) -> u64 {
        self.log.bytes_read.load(Ordering::Relaxed)
    }

    /// Bytes of segment files of this log.
    pub fn disk_bytes(&self) -> u64 {
        self.log
            .files
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .disk_bytes()
    }

    /// Segment files of the log (the active one included).
    pub fn segment_count(&self) -> usize {
        self.log
            .files
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .segments
            .len()
    }
}

impl Store {
    /// Opens (recovering) a data directory and starts the writer and syncer threads.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<(Store, Vec<RecoveredLog>), OpenError> {
        let io = Io {
            fs: opts.fs.clone(),
            faults: opts.faults.clone(),
            files: Arc::new(OpenFiles::new(
                opts.max_open_segment_files.max(MIN_OPEN_SEGMENT_FILES),
            )),
        };
        let mut created = false;
        for sub in ["journal", "checkpoint", "logs"] {
            let path = dir.join(sub);
            if !io.fs.is_dir(&path) {
                io.fs
                    .create_dir_all(&path)
                    .map_err(|e| OpenError::io(&path, e))?;
                io.faults.note(|| FsOp::CreateDir(path.clone()));
                created = true;
            }
        }
        if created {
            fsync_dir(&io, dir).map_err(|e| OpenError::io(dir, e))?;
        }
        let lock = lock_dir(&io, dir)?;
        let recovered = recover(dir, &io, opts.repair_missing)?;
        let Recovered {
            logs,
            next_uid,
            journal_id,
            dropped,
            obsolete_dirs,
        } = recovered;

        let (journal, journal_len) =
            create_journal(&io, dir, journal_id).map_err(|e| OpenError::io(dir, e))?;
        let mut shared_logs = HashMap::new();
        let mut writer_logs = HashMap::new();
        for (state, files) in logs {
            let end = state.next_offset;
            let log = files.map(|files| {
                let log = Arc::new(LogShared {
                    files: RwLock::new(files),
                    durable_end: AtomicU64::new(end),
                    checkpointed_end: AtomicU64::new(0),
                    bytes_read: AtomicU64::new(0),
                    roll_bytes: AtomicU64::new(0),
                    roll_ms: AtomicU64::new(0),
                });
                shared_logs.insert(state.uid, log.clone());
                log
            });
            // Replayed appends are in the page cache only: the first checkpoint syncs them.
            writer_logs.insert(
                state.uid,
                WriterLog {
                    state,
                    shared: log,
                    dirty: true,
                },
            );
        }
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            opts: opts.clone(),
            logs: RwLock::new(shared_logs),
            poisoned: AtomicBool::new(false),
            sync: Mutex::new(SyncState {
                journal: journal.clone(),
                written_seq: 0,
                synced_seq: 0,
                applied_seq: 0,
                pending: VecDeque::new(),
                ends: VecDeque::new(),
                stop: false,
                syncer_dead: false,
            }),
            sync_cv: Condvar::new(),
            listener: OnceLock::new(),
            fatal: OnceLock::new(),
            poison_reason: Mutex::new(None),
            fatal_fired: AtomicBool::new(false),
            journal_bytes: AtomicU64::new(journal_len),
            checkpoint_failures: AtomicU64::new(0),
            fsync_latency: FsyncLatency::default(),
            open_files: io.files.clone(),
            index_bytes: AtomicU64::new(0),
            index_thinnings: AtomicU64::new(0),
        });
        let mut views: HashMap<u64, Vec<u64>> = HashMap::new();
        for log in writer_logs.values() {
            if let Some(source) = log.state.source {
                views.entry(source).or_default().push(log.state.uid);
            }
        }
        let mut writer = Writer {
            shared: shared.clone(),
            logs: writer_logs,
            views,
            next_uid,
            journal,
            journal_id,
            journal_len,
            seq: 0,
            last_checkpoint: Instant::now(),
            changed_since_checkpoint: true,
            checkpoint_retry_at: Instant::now(),
            checkpoint_unsynced: false,
            frame_groups: false,
            deleted_dirs: obsolete_dirs,
            checkpoint_ends: Vec::new(),
        };
        // A first checkpoint makes replayed data durable in segments and drops old journals.
        match writer.checkpoint() {
            Ok(()) => {}
            Err(CheckpointError::Sync(e)) => return Err(OpenError::io(dir, e)),
            // A repair is durable only in a checkpoint (the files still lack what it dropped).
            Err(CheckpointError::Io(e)) if !dropped.is_empty() => {
                return Err(OpenError::io(
                    dir,
                    std::io::Error::new(e.kind(), format!("checkpoint of the repair: {e}")),
                ));
            }
            // Typically a full disk: serve from the replayed journal and checkpoint later.
            Err(CheckpointError::Io(e)) => {
                shared.checkpoint_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "initial checkpoint failed; continuing on the journal")
            }
        }
        // In uid order: the layer above rebuilds (and writes) in the same order every run.
        let mut recovered: Vec<RecoveredLog> =
            writer.logs.values().map(|l| l.state.clone()).collect();
        recovered.sort_unstable_by_key(|l| l.uid);

        let (tx, rx) = sync_channel(opts.write_queue_capacity);
        let syncer_shared = shared.clone();
        let syncer = std::thread::Builder::new()
            .name("tidewater-syncer".into())
            .spawn(move || guarded(&syncer_shared, "syncer", || syncer_loop(&syncer_shared)))
            .map_err(|e| OpenError::io(dir, e))?;
        let writer_shared = shared.clone();
        let writer_thread = std::thread::Builder::new()
            .name("tidewater-writer".into())
            .spawn(move || {
                let rx = rx;
                guarded(&writer_shared, "writer", || writer.run(&rx));
                // After a panic: refuse what is still queued (the store is poisoned now).
                while let Ok(cmd) = rx.try_recv() {
                    match cmd {
                        Command::Write(req) => (req.done)(Err(WriteError::Poisoned)),
                        Command::Checkpoint(reply) => drop(reply.send(Err(WriteError::Poisoned))),
                        Command::Barrier(reply) => drop(reply.send(())),
                        Command::Shutdown(reply) => drop(reply.send(())),
                        Command::Replace { reply, .. } => {
                            drop(reply.send(Err(WriteError::Poisoned)))
                        }
                    }
                }
            })
            .map_err(|e| OpenError::io(dir, e))?;
        let store = Store {
            shared,
            tx,
            threads: Mutex::new(vec![writer_thread, syncer]),
            repair_report: dropped,
            lock: Mutex::new(Some(lock)),
        };
        Ok((store, recovered))
    }

    pub fn set_durable_listener(&self, listener: DurableListener) {
        let _ = self.shared.listener.set(listener);
    }

    /// Sets the listener called once when the store poisons itself; called at once if
    /// it already has.
    pub fn set_fatal_listener(&self, listener: FatalListener) {
        let _ = self.shared.fatal.set(listener);
        self.shared.fire_fatal();
    }

    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::SeqCst)
    }

    /// Why the store is poisoned (a failed fsync, a dead storage thread), if it is.
    pub fn poison_reason(&self) -> Option<String> {
        self.shared
            .poison_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Queues a request; `done` runs on a store thread once it is written or durable, as
    /// asked. Refuses at once when the write queue is full or the store is poisoned.
    pub fn submit(&self, ops: Vec<Op>, level: AckLevel, done: Completion) {
        if self.is_poisoned() {
            return done(Err(WriteError::Poisoned));
        }
        match self
            .tx
            .try_send(Command::Write(Request { ops, level, done }))
        {
            Ok(()) => {}
            Err(TrySendError::Full(Command::Write(req))) => (req.done)(Err(WriteError::Overloaded)),
            Err(TrySendError::Disconnected(Command::Write(req))) => {
                (req.done)(Err(WriteError::ShuttingDown))
            }
            Err(_) => unreachable!("only writes are sent here"),
        }
    }

    /// Checkpoints now, after every request queued before this call, and waits for it:
    /// segments fsynced, a snapshot of every log's state written, a new journal started
    /// and the old ones deleted (for tools and tests; the writer checkpoints on its own
    /// by journal size and time).
    pub fn checkpoint(&self) -> Result<(), WriteError> {
        if self.is_poisoned() {
            return Err(WriteError::Poisoned);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Command::Checkpoint(tx)).is_err() {
            return Err(WriteError::ShuttingDown);
        }
        rx.recv().unwrap_or(Err(WriteError::ShuttingDown))
    }

    /// Asks for a checkpoint soon, without waiting (after requests queued before this call):
    /// e.g. to remove segments retention deleted. Dropped when the write queue is full (the
    /// writer checkpoints on its own then, by journal size and time).
    pub fn request_checkpoint(&self) {
        let (tx, _rx) = std::sync::mpsc::channel();
        let _ = self.tx.try_send(Command::Checkpoint(tx));
    }

    /// Waits until everything written so far has been through the syncer's fdatasync (or
    /// the store is poisoned or stopping), so that no storage thread is doing I/O for a
    /// request answered before this call: a simulation whose driver waits for this after
    /// each answer sees the same file-system operations in the same order every run.
    pub fn wait_synced(&self) {
        self.shared.wait_synced();
    }

    /// Waits until every request submitted before this call is written and through the
    /// syncer's fdatasync (or refused), answered or not: `wait_synced` for callers that do
    /// not wait for every answer (the broker submits some writes without waiting).
    pub fn wait_idle(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Command::Barrier(tx)).is_ok() {
            let _ = rx.recv();
        }
        self.wait_synced();
    }

    /// The options it was opened with.
    pub fn options(&self) -> &StoreOptions {
        &self.shared.opts
    }

    /// The file system this store runs on (`StoreOptions::fs`).
    pub fn fs(&self) -> &Arc<dyn Fs> {
        &self.shared.opts.fs
    }

    /// Free bytes on the file system holding the data directory (statvfs on the real one).
    pub fn disk_free_bytes(&self) -> std::io::Result<u64> {
        self.shared.opts.fs.free_bytes(&self.shared.dir)
    }

    /// Submits and blocks the calling thread until done (for tools and tests).
    pub fn submit_wait(&self, ops: Vec<Op>, level: AckLevel) -> Result<Vec<OpResult>, WriteError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.submit(ops, level, Box::new(move |result| drop(tx.send(result))));
        rx.recv().unwrap_or(Err(WriteError::ShuttingDown))
    }

    /// Sets a log's own segment roll size and age (0: the store's `segment_roll_bytes`
    /// and `segment_roll_ms`), for its next appends. Not durable: the layer above sets it
    /// again from the log's configuration at open.
    pub fn set_segment_roll(&self, uid: u64, bytes: u64, ms: u64) {
        let logs = self.shared.logs.read().unwrap_or_else(|e| e.into_inner());
        if let Some(log) = logs.get(&uid) {
            log.roll_bytes.store(bytes, Ordering::Relaxed);
            log.roll_ms.store(ms, Ordering::Relaxed);
        }
    }

    pub fn reader(&self, uid: u64) -> Option<LogReader> {
        let logs = self.shared.logs.read().unwrap_or_else(|e| e.into_inner());
        logs.get(&uid).map(|log| LogReader { log: log.clone() })
    }

    /// Starts a rewrite of a stream log's sealed segments from `first_base` (compaction):
    /// batches pushed to it go to a new file beside them, written on the calling thread;
    /// `replace_segments` then puts it in their place.
    pub fn rewrite_segments(
        &self,
        uid: u64,
        first_base: u64,
    ) -> Result<SegmentRewrite, WriteError> {
        if self.is_poisoned() {
            return Err(WriteError::Poisoned);
        }
        let log = {
            let logs = self.shared.logs.read().unwrap_or_else(|e| e.into_inner());
            logs.get(&uid).cloned().ok_or(WriteError::UnknownLog(uid))?
        };
        let dir = log
            .files
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .dir
            .clone();
        let io = self.shared.io();
        let writer = SegmentWriter::create(&io, &dir, uid, first_base)
            .map_err(|e| WriteError::from_io(&e))?;
        Ok(SegmentRewrite {
            uid,
            writer: Some(writer),
            io,
            fsync: self.shared.opts.fsync,
        })
    }

    /// Puts a finished rewrite in the place of the sealed segments holding exactly its
    /// offsets, once its file is durable: readers see either the old files or the new one
    /// (a read under way finishes on the old one), and a power loss at any point leaves
    /// one or the other. `Ok(false)` when it can no longer take their place (retention
    /// removed some of them, the log was deleted, or they are not all in a durable
    /// checkpoint yet); its file is removed then.
    pub fn replace_segments(&self, mut rewrite: SegmentRewrite) -> Result<bool, WriteError> {
        let writer = rewrite.writer.take().expect("a rewrite is replaced once");
        let segment = match writer.finish(rewrite.fsync) {
            Ok(segment) => segment,
            Err(err) => return Err(WriteError::from_io(&err)),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let uid = rewrite.uid;
        if let Err(err) = self.tx.send(Command::Replace {
            uid,
            segment,
            reply: tx,
        }) {
            if let Command::Replace { segment, .. } = err.0 {
                discard_rewrite(&rewrite.io, segment);
            }
            return Err(WriteError::ShuttingDown);
        }
        let Some((dir, old)) = rx.recv().unwrap_or(Err(WriteError::ShuttingDown))? else {
            return Ok(false);
        };
        // The rename durable before the other files go: a power loss in between brings
        // back files whose offsets the new one holds, which the open removes.
        let io = &rewrite.io;
        if rewrite.fsync
            && let Err(err) = fsync_dir(io, &dir)
        {
            self.shared.poison(&format!(
                "fsync of {} after a compaction failed: {err}",
                dir.display()
            ));
            return Err(WriteError::Poisoned);
        }
        for path in old {
            if let Err(err) = io.fs.remove_file(&path) {
                // Harmless: the open removes a merged segment's leftover file.
                tracing::warn!(path = %path.display(), error = %err, "could not remove a compacted segment's old file");
            } else {
                io.faults.note(|| FsOp::Remove(path.clone()));
            }
        }
        Ok(true)
    }

    /// What the open dropped as missing, with `StoreOptions::repair_missing` (empty
    /// otherwise: missing data refuses the open).
    pub fn repair_report(&self) -> &[MissingData] {
        &self.repair_report
    }

    /// Checkpoints that failed with an error other than a failed fsync (for example, no
    /// file descriptor left to open a directory): logged and retried a second later.
    pub fn checkpoint_failures(&self) -> u64 {
        self.shared.checkpoint_failures.load(Ordering::Relaxed)
    }

    /// The cache of open segment files: how many it holds, its capacity, and the files
    /// opened and closed since the store opened.
    /// Bytes the segment indexes took at the last checkpoint (at most `max_index_bytes`
    /// plus the active segments'), and how many times a segment's index was halved.
    pub fn index_bytes(&self) -> (u64, u64) {
        (
            self.shared.index_bytes.load(Ordering::Relaxed),
            self.shared.index_thinnings.load(Ordering::Relaxed),
        )
    }

    pub fn segment_files(&self) -> SegmentFiles {
        let files = &self.shared.open_files;
        SegmentFiles {
            open: files.open_now(),
            capacity: files.capacity() as u64,
            opened: files.opens(),
            closed: files.closes(),
        }
    }

    /// How long the journal's fsyncs took since the store opened.
    pub fn fsync_latency(&self) -> LatencySnapshot {
        self.shared.fsync_latency.snapshot()
    }

    /// Bytes in the current journal file.
    pub fn journal_bytes(&self) -> u64 {
        self.shared.journal_bytes.load(Ordering::Relaxed)
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Finishes queued writes, syncs, checkpoints and stops the threads.
    pub fn shutdown(&self) {
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        // The last handle may be dropped by a completion running on one of the store's own
        // threads: that thread must neither wait for its own reply nor join itself (it ends
        // on its own once the shutdown is processed).
        let me = std::thread::current().id();
        let on_own_thread = threads.iter().any(|t| t.thread().id() == me);
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Command::Shutdown(tx)).is_ok() && !on_own_thread {
            let _ = rx.recv();
        }
        for thread in threads {
            if thread.thread().id() != me {
                let _ = thread.join();
            }
        }
        if !on_own_thread {
            self.lock.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Free bytes for unprivileged writers on the (real) file system holding `path`.
pub fn disk_free_bytes(path: &Path) -> std::io::Result<u64> {
    RealFs.free_bytes(path)
}

fn lock_dir(io: &Io, dir: &Path) -> Result<LockGuard, OpenError> {
    let path = dir.join("LOCK");
    match io.fs.lock(&path) {
        Ok(guard) => Ok(guard),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            Err(OpenError::Locked(dir.to_path_buf()))
        }
        Err(e) => Err(OpenError::io(&path, e)),
    }
}

fn journal_path(dir: &Path, id: u64) -> PathBuf {
    dir.join("journal").join(format!("{id:020}.jnl"))
}

fn log_dir(dir: &Path, uid: u64) -> PathBuf {
    dir.join("logs").join(format!("{uid:016x}"))
}

fn list_ids(fs: &dyn Fs, dir: &Path, suffix: &str) -> std::io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for name in fs.read_dir(dir)? {
        if let Some(stem) = name.to_string_lossy().strip_suffix(suffix)
            && let Ok(id) = stem.parse()
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

fn create_journal(io: &Io, dir: &Path, id: u64) -> std::io::Result<(FileRef, u64)> {
    let path = journal_path(dir, id);
    let file = io.fs.open(&path, OpenHow::CREATE_TRUNCATE)?;
    io.faults.note(|| FsOp::CreateFile(path.clone()));
    file.write_all_at(&journal_header(id), 0)?;
    file.sync_all()?;
    fsync_dir(io, &dir.join("journal"))?;
    Ok((file, JOURNAL_HEADER_LEN as u64))
}

struct Recovered {
    /// Every log with its files (`None` for a view: it has none).
    logs: Vec<(LogState, Option<LogFiles>)>,
    next_uid: u64,
    journal_id: u64,
    /// Unsettled messages no file held, settled by a repair.
    dropped: Vec<MissingData>,
    /// Directories of logs deleted since the checkpoint: removed after the next one.
    obsolete_dirs: Vec<PathBuf>,
}

/// The offsets of `range` that `state` does not have settled.
fn unsettled_in(state: &LogState, range: &Range<u64>) -> Vec<Range<u64>> {
    let start = range.start.max(state.ack_floor);
    if start >= range.end {
        return Vec::new();
    }
    if state.settled.count_in(start..range.end) == 0 {
        return vec![start..range.end];
    }
    let mut out = Vec::new();
    let mut at = start;
    for settled in state.settled.iter() {
        if settled.end <= at {
            continue;
        }
        if settled.start >= range.end {
            break;
        }
        if settled.start > at {
            out.push(at..settled.start);
        }
        at = settled.end;
    }
    if at < range.end {
        out.push(at..range.end);
    }
    out
}

fn missing_data(state: &LogState, gap: Gap) -> MissingData {
    MissingData {
        log_uid: state.uid,
        log_name: state.name.clone(),
        offsets: unsettled_in(state, &gap.offsets),
        path: gap.path,
        detail: gap.detail,
    }
}

fn corrupt(path: &Path, position: u64, reason: impl ToString) -> OpenError {
    OpenError::Corrupt {
        path: path.to_path_buf(),
        position,
        reason: reason.to_string(),
    }
}

/// Loads the newest checkpoint, checks segments and replays the journals after it.
fn recover(dir: &Path, io: &Io, repair: bool) -> Result<Recovered, OpenError> {
    let fs = &*io.fs;
    let ckpt_dir = dir.join("checkpoint");
    let ckpts = list_ids(fs, &ckpt_dir, ".ckpt").map_err(|e| OpenError::io(&ckpt_dir, e))?;
    let mut states: HashMap<u64, LogState> = HashMap::new();
    let mut next_uid = 1;
    let mut replay_from = 0;
    if let Some(&id) = ckpts.last() {
        let path = ckpt_dir.join(format!("{id:020}.ckpt"));
        let bytes = fs.read(&path).map_err(|e| OpenError::io(&path, e))?;
        let (uid, logs) = decode_checkpoint(&bytes).map_err(|e| corrupt(&path, 0, e))?;
        next_uid = uid;
        replay_from = id;
        for log in logs {
            states.insert(log.uid, log);
        }
    }
    // Logs the checkpoint holds: should the journal delete one, its directory goes only
    // once a checkpoint without it is durable (as at run time).
    let checkpointed: HashSet<PathBuf> = states.keys().map(|&uid| log_dir(dir, uid)).collect();
    let mut files: HashMap<u64, LogFiles> = HashMap::new();
    let mut missing = Vec::new();
    let mut dropped = Vec::new();
    let mut uids: Vec<u64> = states.keys().copied().collect();
    uids.sort_unstable();
    for uid in uids {
        let state = &states[&uid];
        if state.source.is_some() {
            continue;
        }
        let hole_ok = |range: &Range<u64>| repair || unsettled_in(state, range).is_empty();
        let opened = LogFiles::open(
            log_dir(dir, state.uid),
            state.uid,
            (state.ack_floor, state.next_offset),
            io.clone(),
            &hole_ok,
        )?;
        let log_files = match opened {
            Opened::Files(log_files, holes) => {
                let lost: Vec<MissingData> = holes
                    .into_iter()
                    .map(|gap| missing_data(state, gap))
                    .filter(|m| !m.offsets.is_empty())
                    .collect();
                let state = states.get_mut(&uid).expect("listed");
                for m in lost {
                    tracing::error!("repair: dropping missing messages: {m}");
                    state.settle(&m.offsets);
                    dropped.push(m);
                }
                log_files
            }
            Opened::Missing(gaps) => {
                missing.extend(gaps.into_iter().map(|gap| missing_data(state, gap)));
                continue;
            }
        };
        let state = &states[&uid];
        if log_files.end() < state.next_offset {
            return Err(corrupt(
                &log_files.dir,
                0,
                format!(
                    "log ends at {} below its checkpoint {}",
                    log_files.end(),
                    state.next_offset
                ),
            ));
        }
        files.insert(state.uid, log_files);
    }
    if !missing.is_empty() {
        return Err(OpenError::Missing(missing));
    }

    let jdir = dir.join("journal");
    let journals: Vec<u64> = list_ids(fs, &jdir, ".jnl")
        .map_err(|e| OpenError::io(&jdir, e))?
        .into_iter()
        .filter(|&id| id >= replay_from)
        .collect();
    let mut next_journal = replay_from.max(1);
    for (idx, &id) in journals.iter().enumerate() {
        let last = idx + 1 == journals.len();
        let path = journal_path(dir, id);
        let bytes = fs.read(&path).map_err(|e| OpenError::io(&path, e))?;
        next_journal = id + 1;
        if bytes.len() < JOURNAL_HEADER_LEN || &bytes[..8] != JOURNAL_MAGIC {
            if last {
                // Created but never written: nothing in it was ever acknowledged. Removed
                // (durably, before the next journal is created) so that it is never an
                // earlier journal with a bad header.
                tracing::warn!(path = %path.display(), "removing a journal whose header never became durable");
                fs.remove_file(&path).map_err(|e| OpenError::io(&path, e))?;
                fsync_dir(io, &jdir).map_err(|e| OpenError::io(&jdir, e))?;
                continue;
            }
            return Err(corrupt(&path, 0, "bad journal header"));
        }
        let mut pos = JOURNAL_HEADER_LEN;
        while pos < bytes.len() {
            // A unit is one request: an entry, or a group replayed whole (or, torn, not at
            // all: a power loss may keep a prefix of the write that held it).
            match decode_unit(&bytes[pos..]) {
                Ok((unit, len)) => {
                    let mut apply = |entry| {
                        apply_replayed(dir, io, &mut states, &mut files, &mut next_uid, entry)
                            .map_err(|e| match e {
                                ReplayError::Open(e) => e,
                                ReplayError::Corrupt(reason) => corrupt(&path, pos as u64, reason),
                            })
                    };
                    match unit {
                        Unit::Entry(entry) => apply(entry)?,
                        Unit::Group(entries) => {
                            for entry in entries {
                                apply(entry)?;
                            }
                        }
                    }
                    pos += len;
                }
                Err(UnitError::Torn(err)) if last => {
                    // A torn tail: never acknowledged. Cut it, durably, before the next
                    // journal is created: once that exists this journal is no longer the
                    // last, and a tear in an earlier journal is corruption (a recovery
                    // cut by a power loss after creating the next journal used to leave
                    // a data directory that refused to open). A torn group is cut at its
                    // start: nothing of it is replayed.
                    tracing::warn!(path = %path.display(), position = pos, error = %err, "truncating torn journal tail");
                    let file = fs
                        .open(&path, OpenHow::READ_WRITE)
                        .map_err(|e| OpenError::io(&path, e))?;
                    file.set_len(pos as u64)
                        .and_then(|()| file.sync_all())
                        .map_err(|e| OpenError::io(&path, e))?;
                    break;
                }
                // Intact entries this version cannot replay (a newer version's kind): refused
                // in any journal, never cut off as if torn.
                Err(err) => return Err(corrupt(&path, pos as u64, err)),
            }
        }
    }
    // Segments may hold batches whose journal entries were lost with the page cache: those
    // were never acknowledged, so cut them.
    let mut logs = Vec::new();
    // (In uid order, as every loop over logs that touches files: a simulated disk sees the
    // same operations in the same order for the same history.)
    let mut states: Vec<(u64, LogState)> = states.into_iter().collect();
    states.sort_unstable_by_key(|(uid, _)| *uid);
    check_views(dir, &mut states, repair, &mut dropped)?;
    for (uid, state) in states {
        if state.source.is_some() {
            logs.push((state, None));
            continue;
        }
        let mut log_files = files.remove(&uid).expect("files for every log");
        if log_files.end() > state.next_offset {
            tracing::warn!(
                log = uid,
                segment_end = log_files.end(),
                journal_end = state.next_offset,
                "cutting unacknowledged segment tail"
            );
            log_files.truncate_to(state.next_offset)?;
        }
        logs.push((state, Some(log_files)));
    }
    // Directories of logs that no longer exist. Those of logs deleted before the checkpoint
    // (or never created in it) go now; those of logs the checkpoint holds and the journal
    // deleted only after the first checkpoint (`Recovered::obsolete_dirs`): a power loss in
    // the middle of removing one used to leave the checkpoint naming a log without its
    // files, and the next open refused (`OpenError::Missing`).
    let logs_dir = dir.join("logs");
    let live: HashSet<PathBuf> = logs
        .iter()
        .filter_map(|(_, f)| f.as_ref().map(|f| f.dir.clone()))
        .collect();
    let mut obsolete_dirs = Vec::new();
    for name in fs
        .read_dir(&logs_dir)
        .map_err(|e| OpenError::io(&logs_dir, e))?
    {
        let path = logs_dir.join(name);
        if checkpointed.contains(&path) && !live.contains(&path) {
            obsolete_dirs.push(path);
        } else if !live.contains(&path) {
            fs.remove_dir_all(&path)
                .map_err(|e| OpenError::io(&path, e))?;
        }
    }
    obsolete_dirs.sort();
    Ok(Recovered {
        logs,
        next_uid,
        journal_id: next_journal,
        dropped,
        obsolete_dirs,
    })
}

enum ReplayError {
    Open(OpenError),
    Corrupt(String),
}

/// After replay: each view's end is its source's, and every offset a view has not settled
/// is still in its source (at or above the source's floor, not settled by it: retention
/// and repairs settle the source). The layer above settles views before or with their
/// source, so an offset that is not there is lost data: refused as missing, or settled and
/// reported by a repair. A view of a log that does not exist is corruption.
fn check_views(
    dir: &Path,
    states: &mut [(u64, LogState)],
    repair: bool,
    dropped: &mut Vec<MissingData>,
) -> Result<(), OpenError> {
    let by_uid: HashMap<u64, usize> = states
        .iter()
        .enumerate()
        .map(|(i, (uid, _))| (*uid, i))
        .collect();
    let mut missing = Vec::new();
    for i in 0..states.len() {
        let Some(source) = states[i].1.source else {
            continue;
        };
        let Some(&at) = by_uid
            .get(&source)
            .filter(|&&at| states[at].1.source.is_none())
        else {
            return Err(corrupt(
                &dir.join("checkpoint"),
                0,
                format!(
                    "log {} is a view of log {source}, which does not exist",
                    states[i].0
                ),
            ));
        };
        let (next_offset, gone) = {
            let src = &states[at].1;
            let mut gone = vec![0..src.ack_floor];
            gone.extend(src.settled.iter());
            (src.next_offset, gone)
        };
        let view = &mut states[i].1;
        view.next_offset = next_offset;
        view.ack_floor = view.ack_floor.min(next_offset);
        let offsets: Vec<Range<u64>> = gone
            .iter()
            .flat_map(|range| unsettled_in(view, range))
            .collect();
        if offsets.is_empty() {
            continue;
        }
        let lost = MissingData {
            log_uid: view.uid,
            log_name: view.name.clone(),
            offsets,
            path: log_dir(dir, source),
            detail: format!("removed from the log it is a view of (uid {source})"),
        };
        if repair {
            tracing::error!("repair: dropping missing messages: {lost}");
            view.settle(&lost.offsets);
            dropped.push(lost);
        } else {
            missing.push(lost);
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(OpenError::Missing(missing))
    }
}

/// A view's end follows its source's: brought up to date before it is used in replay.
fn sync_view_end(states: &mut HashMap<u64, LogState>, uid: u64) {
    let Some(source) = states.get(&uid).and_then(|s| s.source) else {
        return;
    };
    if let Some(end) = states.get(&source).map(|s| s.next_offset)
        && let Some(view) = states.get_mut(&uid)
    {
        view.next_offset = view.next_offset.max(end);
    }
}

fn apply_replayed(
    dir: &Path,
    io: &Io,
    states: &mut HashMap<u64, LogState>,
    files: &mut HashMap<u64, LogFiles>,
    next_uid: &mut u64,
    entry: Entry<'_>,
) -> Result<(), ReplayError> {
    match entry {
        Entry::CreateLog { uid, name, config } => {
            *next_uid = (*next_uid).max(uid + 1);
            let path = log_dir(dir, uid);
            let _ = io.fs.remove_dir_all(&path); // a fresh log starts empty
            let log_files =
                LogFiles::create(path, uid, 0, io.clone()).map_err(ReplayError::Open)?;
            files.insert(uid, log_files);
            states.insert(
                uid,
                LogState::new(uid, name.to_string(), config.to_string()),
            );
        }
        Entry::UpdateConfig { uid, config } => {
            if let Some(state) = states.get_mut(&uid) {
                state.config = config.to_string();
            }
        }
        Entry::CreateView {
            uid,
            name,
            source,
            floor,
        } => {
            let Some(src) = states.get(&source).filter(|s| s.source.is_none()) else {
                return Err(ReplayError::Corrupt(format!(
                    "view {uid} of unknown log {source}"
                )));
            };
            *next_uid = (*next_uid).max(uid + 1);
            let mut state = LogState::new(uid, name.to_string(), String::new());
            state.source = Some(source);
            state.next_offset = src.next_offset;
            state.ack_floor = floor.clamp(src.ack_floor.min(src.next_offset), src.next_offset);
            state.settle(&src.settled.iter().collect::<Vec<_>>());
            states.insert(uid, state);
        }
        Entry::DeleteLog { uid } => {
            states.remove(&uid);
            files.remove(&uid);
        }
        Entry::IdWindow {
            uid,
            window_ms,
            max,
        } => {
            if let Some(state) = states.get_mut(&uid) {
                state.recent_ids.set_window(window_ms, max);
            }
        }
        Entry::Data { batch } => {
            let header =
                BatchHeader::decode(batch).map_err(|e| ReplayError::Corrupt(e.to_string()))?;
            let Some(state) = states.get_mut(&header.log_uid) else {
                return Err(ReplayError::Corrupt(format!(
                    "data for unknown log {}",
                    header.log_uid
                )));
            };
            let log_files = files.get_mut(&header.log_uid).expect("files for every log");
            if header.base_offset != state.next_offset {
                return Err(ReplayError::Corrupt(format!(
                    "batch at offset {} but the log is at {}",
                    header.base_offset, state.next_offset
                )));
            }
            let end = header.base_offset + header.count as u64;
            let seg_end = log_files.end();
            if seg_end == header.base_offset {
                append_to_segment(log_files, batch, u64::MAX, 0)
                    .map_err(|e| ReplayError::Open(OpenError::io(&log_files.dir, e)))?;
            } else if seg_end < header.base_offset {
                return Err(ReplayError::Corrupt(format!(
                    "segment ends at {seg_end}, before replayed batch {}",
                    header.base_offset
                )));
            }
            state.next_offset = end;
            state.recent_ids.remember_batch(batch);
        }
        Entry::Settle { uid, ranges } => {
            sync_view_end(states, uid);
            if let Some(state) = states.get_mut(&uid) {
                state.settle(&ranges);
            }
        }
        Entry::Retry {
            uid,
            offset,
            deliver_at_ms,
            delivery_count,
            at_ms,
            error,
        } => {
            sync_view_end(states, uid);
            if let Some(state) = states.get_mut(&uid) {
                state.record_retry(offset, deliver_at_ms, delivery_count, at_ms, error);
            }
        }
        // `decode_unit` reads a group's header with its entries.
        Entry::Group { .. } => {
            return Err(ReplayError::Corrupt("a group header out of place".into()));
        }
    }
    Ok(())
}

/// Appends encoded batches (back to back) to a log's active segment, rolling first when the
/// active segment is over `roll_bytes`.
fn append_to_segment(
    files: &mut LogFiles,
    batches: &[u8],
    roll_bytes: u64,
    roll_ms: u64,
) -> std::io::Result<()> {
    let published_at_ms = BatchHeader::decode(batches)
        .map(|h| h.published_at_ms)
        .unwrap_or(i64::MIN);
    if files.active().len >= roll_bytes || files.active().due_to_roll(published_at_ms, roll_ms) {
        let end = files.end();
        files.roll(end)?;
    }
    let mut at = 0;
    let mut end = files.end();
    while at < batches.len() {
        let header = BatchHeader::decode(&batches[at..]).map_err(std::io::Error::other)?;
        end = header.base_offset + header.count as u64;
        at += header.total_len();
    }
    let active = files.active();
    let start = active.len;
    let file = files.active_file()?;
    if let Err(err) = file.write_all_at(batches, start) {
        let _ = file.set_len(start);
        return Err(err);
    }
    files.note_appended(batches, start + batches.len() as u64, end);
    Ok(())
}

/// Version 04 when some log is a view, else 03 (which an older binary still reads).
pub(crate) fn encode_checkpoint(next_uid: u64, logs: &[&LogState]) -> Vec<u8> {
    let views = logs.iter().any(|log| log.source.is_some());
    let mut payload = Vec::new();
    payload.extend_from_slice(&next_uid.to_le_bytes());
    payload.extend_from_slice(&(logs.len() as u64).to_le_bytes());
    for log in logs {
        if views {
            log.encode(&mut payload);
        } else {
            log.encode_03(&mut payload);
        }
    }
    let mut out = Vec::with_capacity(payload.len() + 20);
    out.extend_from_slice(if views {
        CHECKPOINT_MAGIC_04
    } else {
        CHECKPOINT_MAGIC
    });
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

pub(crate) fn decode_checkpoint(bytes: &[u8]) -> Result<(u64, Vec<LogState>), FormatError> {
    let mut cur = Cursor { buf: bytes, pos: 0 };
    let magic = cur.bytes(8)?;
    if magic != CHECKPOINT_MAGIC_04 && magic != CHECKPOINT_MAGIC && magic != CHECKPOINT_MAGIC_02 {
        return Err(FormatError::BadMagic);
    }
    let with_source = magic == CHECKPOINT_MAGIC_04;
    let len = crate::usize_of(cur.u64()?);
    let crc = cur.u32()?;
    let payload = cur.bytes(len)?;
    if crc32c::crc32c(payload) != crc {
        return Err(FormatError::BadChecksum);
    }
    let mut cur = Cursor {
        buf: payload,
        pos: 0,
    };
    let next_uid = cur.u64()?;
    let n = cur.u64()?;
    let mut logs = Vec::new();
    for _ in 0..n {
        logs.push(LogState::decode(&mut cur, with_source)?);
    }
    if !cur.done() {
        return Err(FormatError::BadLength);
    }
    Ok((next_uid, logs))
}

struct WriterLog {
    state: LogState,
    /// The log's files and reader state; `None` for a view, which has no files: no file
    /// operation (appends, checkpoint fsyncs, removing settled segments, compaction's
    /// rewrites, deleting the directory) can reach its source's files through it.
    shared: Option<Arc<LogShared>>,
    /// Segment bytes written since the last checkpoint (need an fsync then).
    dirty: bool,
}

struct Writer {
    shared: Arc<Shared>,
    logs: HashMap<u64, WriterLog>,
    /// The views of each log that has some (source uid -> view uids).
    views: HashMap<u64, Vec<u64>>,
    next_uid: u64,
    journal: FileRef,
    journal_id: u64,
    journal_len: u64,
    seq: u64,
    last_checkpoint: Instant,
    changed_since_checkpoint: bool,
    checkpoint_retry_at: Instant,
    /// The newest checkpoint was renamed into place but its directory is not fsynced yet:
    /// nothing it replaces may be deleted until it is.
    checkpoint_unsynced: bool,
    /// A request of two or more journal entries is written as a group (replayed all or
    /// nothing). Only once this process has a checkpoint (version 03) in place, durably:
    /// before that (the open's checkpoint failed, a full disk say) recovery by an older
    /// binary could start from a version 02 checkpoint and cut the journal at the first
    /// group as a torn tail, so requests are written unframed (replayed entry by entry,
    /// as before groups: a torn move may keep its copy without its settle).
    frame_groups: bool,
    deleted_dirs: Vec<PathBuf>,
    /// Each log's end in the checkpoint written last, until its name is durable.
    checkpoint_ends: Vec<(u64, u64)>,
}

/// A request staged for the current round.
struct Staged {
    req: Request,
    results: Vec<OpResult>,
}

impl Writer {
    fn run(mut self, rx: &Receiver<Command>) {
        let mut shutdown_reply = None;
        let mut carry: Option<Command> = None;
        while shutdown_reply.is_none() {
            let first = match carry.take() {
                Some(cmd) => cmd,
                None => match rx.recv_timeout(
                    self.shared
                        .opts
                        .checkpoint_interval
                        .min(Duration::from_secs(1)),
                ) {
                    Ok(cmd) => cmd,
                    Err(RecvTimeoutError::Timeout) => {
                        self.maybe_checkpoint();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            let mut round: Vec<Request> = Vec::new();
            let mut round_bytes = 0usize;
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                match cmd {
                    Command::Shutdown(reply) => {
                        shutdown_reply = Some(reply);
                        break;
                    }
                    Command::Checkpoint(reply) => {
                        self.write_round(std::mem::take(&mut round));
                        round_bytes = 0;
                        let result = if self.shared.poisoned.load(Ordering::SeqCst) {
                            Err(WriteError::Poisoned)
                        } else {
                            self.changed_since_checkpoint = true;
                            self.run_checkpoint()
                        };
                        let _ = reply.send(result);
                    }
                    Command::Barrier(reply) => {
                        self.write_round(std::mem::take(&mut round));
                        round_bytes = 0;
                        let _ = reply.send(());
                    }
                    Command::Replace {
                        uid,
                        segment,
                        reply,
                    } => {
                        self.write_round(std::mem::take(&mut round));
                        round_bytes = 0;
                        let _ = reply.send(self.replace_segments(uid, segment));
                    }
                    Command::Write(req) => {
                        if req.ops.iter().any(Op::is_meta) {
                            // Meta changes go alone, after what is staged.
                            self.write_round(std::mem::take(&mut round));
                            self.write_meta(req);
                        } else {
                            round_bytes += req.ops.iter().map(op_size).sum::<usize>();
                            round.push(req);
                        }
                    }
                }
                if round_bytes < self.shared.opts.max_round_bytes && !self.shared.opts.lockstep {
                    match rx.try_recv() {
                        Ok(cmd) => next = Some(cmd),
                        Err(_) => break,
                    }
                }
            }
            self.write_round(round);
            if self.shared.opts.lockstep {
                self.shared.wait_synced();
            }
            self.maybe_checkpoint();
        }
        // Drain what is left, then a final checkpoint and stop the syncer.
        while let Ok(cmd) = rx.try_recv() {
            match cmd {
                Command::Write(req) => self.write_round(vec![req]),
                Command::Replace { segment, reply, .. } => {
                    discard_rewrite(&self.shared.io(), segment);
                    let _ = reply.send(Err(WriteError::ShuttingDown));
                }
                _ => {}
            }
        }
        if !self.shared.poisoned.load(Ordering::SeqCst) {
            self.changed_since_checkpoint = true;
            let _ = self.run_checkpoint();
        }
        {
            let mut sync = self.shared.sync.lock().unwrap_or_else(|e| e.into_inner());
            sync.stop = true;
            self.shared.sync_cv.notify_all();
        }
        if let Some(reply) = shutdown_reply {
            let _ = reply.send(());
        }
    }

    fn maybe_checkpoint(&mut self) {
        if self.shared.poisoned.load(Ordering::SeqCst) {
            return;
        }
        if Instant::now() < self.checkpoint_retry_at {
            return;
        }
        let due = self.journal_len >= self.shared.opts.journal_roll_bytes
            || self.checkpoint_unsynced
            || (self.changed_since_checkpoint
                && self.last_checkpoint.elapsed() >= self.shared.opts.checkpoint_interval);
        if due {
            let _ = self.run_checkpoint();
        }
    }

    fn run_checkpoint(&mut self) -> Result<(), WriteError> {
        match self.checkpoint() {
            Ok(()) => Ok(()),
            Err(CheckpointError::Sync(err)) => {
                self.shared
                    .poison(&format!("checkpoint fsync failed: {err}"));
                Err(WriteError::Poisoned)
            }
            Err(CheckpointError::Io(err)) => {
                self.shared
                    .checkpoint_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %err, "checkpoint failed; the journal keeps everything, retrying in 1 s");
                self.checkpoint_retry_at = Instant::now() + Duration::from_secs(1);
                Err(WriteError::from_io(&err))
            }
        }
    }

    /// Stages, writes and applies one round of data requests.
    fn write_round(&mut self, round: Vec<Request>) {
        if round.is_empty() {
            return;
        }
        if Faults::take(&self.shared.opts.faults.panic_writer) {
            panic!("injected fault: the writer thread panics");
        }
        if self.shared.poisoned.load(Ordering::SeqCst) {
            for req in round {
                (req.done)(Err(WriteError::Poisoned));
            }
            return;
        }
        let mut jbuf = Vec::with_capacity(
            round
                .iter()
                .map(|r| r.ops.iter().map(op_size).sum::<usize>() + 64)
                .sum(),
        );
        // Per log: tentative next offset and the batches to write through to its segment.
        let mut next: HashMap<u64, u64> = HashMap::new();
        // Ordered by uid: the same round writes its segments in the same order.
        let mut seg_bufs: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut staged: Vec<Staged> = Vec::with_capacity(round.len());
        for mut req in round {
            match self.stage(&mut req, &mut jbuf, &mut next, &mut seg_bufs) {
                Ok(results) => staged.push(Staged { req, results }),
                Err(err) => (req.done)(Err(err)),
            }
        }
        if staged.is_empty() {
            return;
        }
        // Write: journal first, then segments. On failure undo everything of this round.
        let journal_start = self.journal_len;
        let mut marks = Vec::new();
        let mut result = self.journal.write_all_at(&jbuf, journal_start);
        if result.is_ok() {
            for (uid, bytes) in &seg_bufs {
                let log = self.logs.get_mut(uid).expect("staged log exists");
                let shared = log.shared.as_ref().expect("appends are refused on views");
                let mut files = shared.files.write().unwrap_or_else(|e| e.into_inner());
                marks.push((*uid, files.mark()));
                log.dirty = true;
                let own = |v: &AtomicU64, store: u64| match v.load(Ordering::Relaxed) {
                    0 => store,
                    own => own,
                };
                let roll_bytes = own(&shared.roll_bytes, self.shared.opts.segment_roll_bytes);
                let roll_ms = own(&shared.roll_ms, self.shared.opts.segment_roll_ms);
                if let Err(err) = append_to_segment(&mut files, bytes, roll_bytes, roll_ms) {
                    result = Err(err);
                    break;
                }
            }
        }
        if let Err(err) = result {
            tracing::error!(error = %err, "write failed; refusing this round's requests");
            let _ = self.journal.set_len(journal_start);
            for (uid, mark) in marks {
                let shared = self.logs[&uid].shared.as_ref().expect("appended to");
                let mut files = shared.files.write().unwrap_or_else(|e| e.into_inner());
                if let Err(undo) = files.rollback(mark) {
                    self.shared
                        .poison(&format!("could not undo a failed write: {undo}"));
                }
            }
            let error = WriteError::from_io(&err);
            for s in staged {
                (s.req.done)(Err(error.clone()));
            }
            return;
        }
        self.journal_len += jbuf.len() as u64;
        self.shared
            .journal_bytes
            .store(self.journal_len, Ordering::Relaxed);
        self.changed_since_checkpoint = true;
        // Apply the durable state: ends first (a settle or retry may name offsets appended
        // in the same round; views' ends follow their sources'), then the ops in order.
        for (uid, end) in &next {
            self.logs.get_mut(uid).unwrap().state.next_offset = *end;
            for view in self.views.get(uid).into_iter().flatten() {
                self.logs.get_mut(view).unwrap().state.next_offset = *end;
            }
        }
        for s in &staged {
            for op in &s.req.ops {
                match op {
                    Op::Append { uid, batch } => self
                        .logs
                        .get_mut(uid)
                        .unwrap()
                        .state
                        .recent_ids
                        .remember_batch(batch),
                    Op::Settle { uid, ranges } => {
                        self.logs.get_mut(uid).unwrap().state.settle(ranges)
                    }
                    Op::Retry {
                        uid,
                        offset,
                        deliver_at_ms,
                        delivery_count,
                        at_ms,
                        error,
                    } => self.logs.get_mut(uid).unwrap().state.record_retry(
                        *offset,
                        *deliver_at_ms,
                        *delivery_count,
                        *at_ms,
                        error,
                    ),
                    _ => unreachable!("meta ops are written alone"),
                }
            }
        }
        self.publish(staged, next.into_iter().collect());
    }

    /// Validates one request and encodes it into the round's buffers.
    fn stage(
        &self,
        req: &mut Request,
        jbuf: &mut Vec<u8>,
        next: &mut HashMap<u64, u64>,
        seg_bufs: &mut BTreeMap<u64, Vec<u8>>,
    ) -> Result<Vec<OpResult>, WriteError> {
        // Validate first so that a refused request leaves no bytes behind.
        let mut tentative: HashMap<u64, u64> = HashMap::new();
        for op in &req.ops {
            let uid = op_uid(op);
            let log = self.logs.get(&uid).ok_or(WriteError::UnknownLog(uid))?;
            // A view's offsets are its source's.
            let of = log.state.source.unwrap_or(uid);
            let end = *tentative
                .entry(of)
                .or_insert_with(|| *next.get(&of).unwrap_or(&self.logs[&of].state.next_offset));
            match op {
                Op::Append { .. } if log.state.source.is_some() => {
                    return Err(WriteError::Invalid(format!(
                        "log {uid} is a view: its records are those of log {of}"
                    )));
                }
                Op::Append { batch, .. } => {
                    let header = check_batch(batch)
                        .map_err(|e| WriteError::Invalid(format!("bad batch: {e}")))?;
                    if header.log_uid != uid || header.total_len() != batch.len() {
                        return Err(WriteError::Invalid("batch does not match its log".into()));
                    }
                    tentative.insert(uid, end + header.count as u64);
                }
                Op::Settle { ranges, .. } => {
                    if ranges.iter().any(|r| r.start > r.end || r.end > end) {
                        return Err(WriteError::Invalid(
                            "settle range beyond the log end".into(),
                        ));
                    }
                }
                Op::Retry { offset, .. } => {
                    if *offset >= end {
                        return Err(WriteError::Invalid("retry beyond the log end".into()));
                    }
                }
                _ => unreachable!("meta ops are written alone"),
            }
        }
        let mut results = Vec::with_capacity(req.ops.len());
        // Two or more entries: one group, replayed all or nothing (a single entry is whole
        // or torn by itself and needs no frame).
        let group = (req.ops.len() > 1 && self.frame_groups).then(|| begin_group(jbuf));
        for op in &mut req.ops {
            match op {
                Op::Append { uid, batch } => {
                    let end = next.entry(*uid).or_insert(self.logs[uid].state.next_offset);
                    stamp_batch(batch, *end);
                    let header = BatchHeader::decode(batch).expect("checked above");
                    encode_entry(jbuf, &Entry::Data { batch });
                    seg_bufs.entry(*uid).or_default().extend_from_slice(batch);
                    results.push(OpResult::Appended {
                        base_offset: *end,
                        count: header.count,
                    });
                    *end += header.count as u64;
                }
                Op::Settle { uid, ranges } => {
                    encode_entry(
                        jbuf,
                        &Entry::Settle {
                            uid: *uid,
                            ranges: ranges.clone(),
                        },
                    );
                    results.push(OpResult::Done);
                }
                Op::Retry {
                    uid,
                    offset,
                    deliver_at_ms,
                    delivery_count,
                    at_ms,
                    error,
                } => {
                    encode_entry(
                        jbuf,
                        &Entry::Retry {
                            uid: *uid,
                            offset: *offset,
                            deliver_at_ms: *deliver_at_ms,
                            delivery_count: *delivery_count,
                            at_ms: *at_ms,
                            error,
                        },
                    );
                    results.push(OpResult::Done);
                }
                _ => unreachable!(),
            }
        }
        if let Some(at) = group {
            finish_group(jbuf, at, crate::narrow(req.ops.len(), "a request's ops"));
        }
        Ok(results)
    }

    /// Answers `written` requests now and hands the rest to the syncer.
    fn publish(&mut self, staged: Vec<Staged>, ends: Vec<(u64, u64)>) {
        self.seq += 1;
        let seq = self.seq;
        let mut now = Vec::new();
        let mut refused = Vec::new();
        {
            let mut sync = self.shared.sync.lock().unwrap_or_else(|e| e.into_inner());
            for s in staged {
                match s.req.level {
                    AckLevel::Written => now.push((s.req.done, s.results)),
                    // No syncer will ever answer it.
                    AckLevel::Durable if sync.syncer_dead => refused.push(s.req.done),
                    AckLevel::Durable => sync.pending.push_back((seq, s.req.done, s.results)),
                }
            }
            for (uid, end) in ends {
                sync.ends.push_back((seq, uid, end));
            }
            sync.written_seq = seq;
            self.shared.sync_cv.notify_all();
        }
        for (done, results) in now {
            done(Ok(results));
        }
        for done in refused {
            done(Err(WriteError::Poisoned));
        }
    }

    fn write_meta(&mut self, mut req: Request) {
        if self.shared.poisoned.load(Ordering::SeqCst) {
            return (req.done)(Err(WriteError::Poisoned));
        }
        let mut jbuf = Vec::new();
        let mut results = Vec::new();
        // Logs created by this request (`None`: a view, no files).
        let mut created: Vec<(LogState, Option<LogFiles>)> = Vec::new();
        let mut deleted = Vec::new();
        let mut updated = Vec::new();
        let mut windows = Vec::new();
        let entries: usize = req
            .ops
            .iter()
            .map(|op| match op {
                Op::CreateLog { id_window, .. } => 1 + id_window.is_some() as usize,
                _ => 1,
            })
            .sum();
        let group = (entries > 1 && self.frame_groups).then(|| begin_group(&mut jbuf));
        for op in &mut req.ops {
            match op {
                Op::CreateLog {
                    name,
                    config,
                    id_window,
                } => {
                    let uid = self.next_uid + created.len() as u64;
                    let files = match LogFiles::create(
                        log_dir(&self.shared.dir, uid),
                        uid,
                        0,
                        self.shared.io(),
                    ) {
                        Ok(files) => files,
                        Err(OpenError::Io { source, .. }) => {
                            return (req.done)(Err(WriteError::from_io(&source)));
                        }
                        Err(other) => return (req.done)(Err(WriteError::Io(other.to_string()))),
                    };
                    encode_entry(&mut jbuf, &Entry::CreateLog { uid, name, config });
                    if let Some((window_ms, max)) = *id_window {
                        encode_entry(
                            &mut jbuf,
                            &Entry::IdWindow {
                                uid,
                                window_ms,
                                max,
                            },
                        );
                        windows.push((uid, window_ms, max));
                    }
                    created.push((
                        LogState::new(uid, name.clone(), config.clone()),
                        Some(files),
                    ));
                    results.push(OpResult::Created { uid });
                }
                Op::CreateView {
                    name,
                    source,
                    floor,
                } => {
                    let uid = self.next_uid + created.len() as u64;
                    let of = self.logs.get(source).map(|l| &l.state).or_else(|| {
                        created
                            .iter()
                            .map(|(state, _)| state)
                            .find(|state| state.uid == *source)
                    });
                    let Some(of) = of.filter(|of| of.source.is_none()) else {
                        discard_created(&self.shared.opts.fs, created);
                        return (req.done)(Err(WriteError::Invalid(format!(
                            "a view needs a log that is not a view; log {source} is not one"
                        ))));
                    };
                    let floor = (*floor).clamp(of.ack_floor, of.next_offset);
                    encode_entry(
                        &mut jbuf,
                        &Entry::CreateView {
                            uid,
                            name,
                            source: *source,
                            floor,
                        },
                    );
                    let mut state = LogState::new(uid, name.clone(), String::new());
                    state.source = Some(*source);
                    state.next_offset = of.next_offset;
                    state.ack_floor = floor;
                    // What the source let go is gone for the view too.
                    state.settle(&of.settled.iter().collect::<Vec<_>>());
                    created.push((state, None));
                    results.push(OpResult::Created { uid });
                }
                Op::UpdateConfig { uid, config } => {
                    if !self.logs.contains_key(uid) {
                        return (req.done)(Err(WriteError::UnknownLog(*uid)));
                    }
                    encode_entry(&mut jbuf, &Entry::UpdateConfig { uid: *uid, config });
                    updated.push((*uid, config.clone()));
                    results.push(OpResult::Done);
                }
                Op::IdWindow {
                    uid,
                    window_ms,
                    max,
                } => {
                    if !self.logs.contains_key(uid) {
                        return (req.done)(Err(WriteError::UnknownLog(*uid)));
                    }
                    encode_entry(
                        &mut jbuf,
                        &Entry::IdWindow {
                            uid: *uid,
                            window_ms: *window_ms,
                            max: *max,
                        },
                    );
                    windows.push((*uid, *window_ms, *max));
                    results.push(OpResult::Done);
                }
                Op::DeleteLog { uid } => {
                    if !self.logs.contains_key(uid) {
                        discard_created(&self.shared.opts.fs, created);
                        return (req.done)(Err(WriteError::UnknownLog(*uid)));
                    }
                    encode_entry(&mut jbuf, &Entry::DeleteLog { uid: *uid });
                    deleted.push(*uid);
                    results.push(OpResult::Done);
                }
                _ => {
                    return (req.done)(Err(WriteError::Invalid(
                        "data ops cannot share a request with meta ops".into(),
                    )));
                }
            }
        }
        // A log goes with its views, or after them: never a view without its source.
        let orphan = deleted.iter().find_map(|uid| {
            let mut views = self.views.get(uid).into_iter().flatten().copied();
            let mut new_views = created
                .iter()
                .filter(|(state, _)| state.source == Some(*uid))
                .map(|(state, _)| state.uid);
            views
                .find(|view| !deleted.contains(view))
                .or_else(|| new_views.next())
                .map(|view| (*uid, view))
        });
        if let Some((uid, view)) = orphan {
            discard_created(&self.shared.opts.fs, created);
            return (req.done)(Err(WriteError::Invalid(format!(
                "log {uid} has a view (log {view}): delete the view first, or with it"
            ))));
        }
        if let Some(at) = group {
            finish_group(&mut jbuf, at, crate::narrow(entries, "a request's entries"));
        }
        let written = if Faults::take_at(&self.shared.opts.faults.fail_meta_write_at) {
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
        } else {
            self.journal.write_all_at(&jbuf, self.journal_len)
        };
        if let Err(err) = written {
            let _ = self.journal.set_len(self.journal_len);
            discard_created(&self.shared.opts.fs, created);
            return (req.done)(Err(WriteError::from_io(&err)));
        }
        self.journal_len += jbuf.len() as u64;
        self.changed_since_checkpoint = true;
        self.next_uid += created.len() as u64;
        let mut shared_logs = self.shared.logs.write().unwrap_or_else(|e| e.into_inner());
        for (state, files) in created {
            let shared = files.map(|files| {
                let shared = Arc::new(LogShared {
                    files: RwLock::new(files),
                    durable_end: AtomicU64::new(0),
                    checkpointed_end: AtomicU64::new(0),
                    bytes_read: AtomicU64::new(0),
                    roll_bytes: AtomicU64::new(0),
                    roll_ms: AtomicU64::new(0),
                });
                shared_logs.insert(state.uid, shared.clone());
                shared
            });
            if let Some(source) = state.source {
                self.views.entry(source).or_default().push(state.uid);
            }
            self.logs.insert(
                state.uid,
                WriterLog {
                    state,
                    shared,
                    dirty: false,
                },
            );
        }
        for (uid, config) in updated {
            if let Some(log) = self.logs.get_mut(&uid) {
                log.state.config = config;
            }
        }
        for (uid, window_ms, max) in windows {
            if let Some(log) = self.logs.get_mut(&uid) {
                log.state.recent_ids.set_window(window_ms, max);
            }
        }
        for uid in deleted {
            shared_logs.remove(&uid);
            self.views.remove(&uid);
            let Some(log) = self.logs.remove(&uid) else {
                continue;
            };
            match log.state.source {
                Some(source) => {
                    if let Some(views) = self.views.get_mut(&source) {
                        views.retain(|&view| view != uid);
                    }
                }
                None => self.deleted_dirs.push(log_dir(&self.shared.dir, uid)),
            }
        }
        drop(shared_logs);
        let staged = vec![Staged { results, req }];
        self.publish(staged, Vec::new());
    }

    /// Keeps the segment indexes within `max_index_bytes`: halves the indexes of the most
    /// indexed sealed segments until the total fits (or only one mark each is left).
    fn bound_indexes(&mut self) {
        let budget = self.shared.opts.max_index_bytes;
        let mut total = 0usize;
        // (bytes, uid, segment number) of every sealed segment.
        let mut sealed: Vec<(usize, u64, usize)> = Vec::new();
        for (uid, log) in &self.logs {
            let Some(shared) = &log.shared else {
                continue;
            };
            let files = shared.files.read().unwrap_or_else(|e| e.into_inner());
            let n = files.segments.len();
            for (i, seg) in files.segments.iter().enumerate() {
                let bytes = seg.index_bytes();
                total += bytes;
                if i + 1 < n {
                    sealed.push((bytes, *uid, i));
                }
            }
        }
        if total > budget {
            // The most indexed first; ties by log and segment, so runs are repeatable.
            let mut heap: std::collections::BinaryHeap<(usize, std::cmp::Reverse<(u64, usize)>)> =
                sealed
                    .into_iter()
                    .map(|(bytes, uid, i)| (bytes, std::cmp::Reverse((uid, i))))
                    .collect();
            while total > budget {
                let Some((bytes, std::cmp::Reverse((uid, i)))) = heap.pop() else {
                    break;
                };
                let shared = self.logs[&uid].shared.as_ref().expect("listed above");
                let mut files = shared.files.write().unwrap_or_else(|e| e.into_inner());
                let seg = &mut files.segments[i];
                if !seg.thin_index() {
                    continue;
                }
                self.shared.index_thinnings.fetch_add(1, Ordering::Relaxed);
                let after = seg.index_bytes();
                total = total - bytes + after;
                heap.push((after, std::cmp::Reverse((uid, i))));
            }
        }
        self.shared
            .index_bytes
            .store(total as u64, Ordering::Relaxed);
    }

    /// Renames a rewritten segment over the sealed ones it stands for (`LogFiles::replace`,
    /// under the log's lock: no reader is between two files); the caller makes the rename
    /// durable and removes the other files. `Ok(None)`, the file removed, when those
    /// segments are gone or not all in a durable checkpoint yet. (Only the rename is the
    /// writer's: the directory's fsync would hold up the appends behind it.)
    fn replace_segments(
        &mut self,
        uid: u64,
        segment: Segment,
    ) -> Result<Option<Replaced>, WriteError> {
        let io = self.shared.io();
        if self.shared.poisoned.load(Ordering::SeqCst) {
            discard_rewrite(&io, segment);
            return Err(WriteError::Poisoned);
        }
        let Some(log) = self.logs.get(&uid).and_then(|log| log.shared.as_ref()) else {
            discard_rewrite(&io, segment);
            return Ok(None);
        };
        if segment.end > log.checkpointed_end.load(Ordering::Acquire) {
            discard_rewrite(&io, segment);
            return Ok(None);
        }
        let temp = segment.path.clone();
        let mut files = log.files.write().unwrap_or_else(|e| e.into_inner());
        let dir = files.dir.clone();
        let replaced = files.replace(segment);
        drop(files);
        match replaced {
            Ok(Some(old)) => Ok(Some((dir, old))),
            Ok(None) => {
                let _ = io.fs.remove_file(&temp);
                Ok(None)
            }
            Err(err) => {
                let _ = io.fs.remove_file(&temp);
                Err(WriteError::from_io(&err))
            }
        }
    }

    /// Makes everything written so far durable without the journal, then starts a new
    /// journal and deletes the old ones, settled segments and deleted logs.
    fn checkpoint(&mut self) -> Result<(), CheckpointError> {
        self.bound_indexes();
        if !self.changed_since_checkpoint {
            self.last_checkpoint = Instant::now();
            if self.checkpoint_unsynced {
                return self.finish_checkpoint();
            }
            return Ok(());
        }
        let fsync = self.shared.opts.fsync;
        let io = self.shared.io();
        let mut uids: Vec<u64> = self.logs.keys().copied().collect();
        uids.sort_unstable();
        for uid in uids {
            let log = self.logs.get_mut(&uid).expect("listed");
            if let Some(shared) = log.shared.as_ref().filter(|_| log.dirty) {
                let files = shared.files.read().unwrap_or_else(|e| e.into_inner());
                if fsync {
                    for seg in &files.segments {
                        seg.sync_if_written(&io).map_err(|e| match e {
                            Ok(open) => CheckpointError::Io(open),
                            Err(sync) => CheckpointError::Sync(sync),
                        })?;
                    }
                }
                log.dirty = false;
            }
        }
        let new_id = self.journal_id + 1;
        let dir = self.shared.dir.clone();
        let ckpt_dir = dir.join("checkpoint");
        let tmp = ckpt_dir.join("checkpoint.tmp");
        let (fs, faults) = (&*io.fs, &io.faults);
        if fsync {
            // Until the new checkpoint's name is durable, recovery may start from the
            // previous one and replay this journal in full: its tail must not be torn.
            self.journal.sync_data().map_err(CheckpointError::Sync)?;
            faults.note(|| FsOp::SyncFile(journal_path(&dir, self.journal_id)));
        }
        let (journal, journal_len) = create_journal(&io, &dir, new_id).map_err(|e| {
            let _ = fs.remove_file(&journal_path(&dir, new_id));
            CheckpointError::Io(e)
        })?;
        let mut states: Vec<&LogState> = self.logs.values().map(|l| &l.state).collect();
        states.sort_by_key(|s| s.uid);
        let bytes = encode_checkpoint(self.next_uid, &states);
        self.checkpoint_ends = states.iter().map(|s| (s.uid, s.next_offset)).collect();
        let written = fs
            .open(&tmp, OpenHow::CREATE_TRUNCATE)
            .and_then(|file| file.write_all_at(&bytes, 0).map(|()| file));
        let file = match written {
            Ok(file) => file,
            Err(err) => {
                // Typically ENOSPC: keep the old journal and checkpoint, try again later.
                let _ = fs.remove_file(&tmp);
                let _ = fs.remove_file(&journal_path(&dir, new_id));
                return Err(CheckpointError::Io(err));
            }
        };
        if fsync {
            file.sync_all().map_err(CheckpointError::Sync)?;
        }
        let ckpt_path = ckpt_dir.join(format!("{new_id:020}.ckpt"));
        if let Err(err) = fs.rename(&tmp, &ckpt_path) {
            let _ = fs.remove_file(&tmp);
            let _ = fs.remove_file(&journal_path(&dir, new_id));
            return Err(CheckpointError::Io(err));
        }
        faults.note(|| FsOp::Rename {
            from: tmp.clone(),
            to: ckpt_path.clone(),
        });
        // The checkpoint is in place: switch journals. Recovery from it replays the new
        // journal; recovery from the one before (should the rename not survive a power
        // loss) replays the old journal and the new one, so both hold until the directory
        // is fsynced and the old files are deleted (`finish_checkpoint`).
        {
            let mut sync = self.shared.sync.lock().unwrap_or_else(|e| e.into_inner());
            sync.journal = journal.clone();
        }
        self.journal = journal;
        self.journal_id = new_id;
        self.journal_len = journal_len;
        self.shared
            .journal_bytes
            .store(journal_len, Ordering::Relaxed);
        self.changed_since_checkpoint = false;
        self.last_checkpoint = Instant::now();
        self.checkpoint_unsynced = true;
        self.finish_checkpoint()
    }

    /// Makes the newest checkpoint's name durable (fsync of its directory), then deletes
    /// the journals, checkpoints, segments and logs it replaces. Failing to open the
    /// directory (say EMFILE) is retried later; a failed fsync poisons.
    fn finish_checkpoint(&mut self) -> Result<(), CheckpointError> {
        let dir = self.shared.dir.clone();
        if self.shared.opts.fsync {
            let ckpt_dir = dir.join("checkpoint");
            let handle =
                if Faults::take_count(&self.shared.opts.faults.checkpoint_dir_open_failures) {
                    Err(std::io::Error::from_raw_os_error(libc::EMFILE))
                } else {
                    self.shared.opts.fs.open_dir(&ckpt_dir)
                };
            let handle = handle.map_err(|e| {
                CheckpointError::Io(std::io::Error::new(
                    e.kind(),
                    format!("opening {} to fsync it: {e}", ckpt_dir.display()),
                ))
            })?;
            handle.sync_all().map_err(CheckpointError::Sync)?;
            self.shared
                .opts
                .faults
                .note(|| FsOp::SyncDir(ckpt_dir.clone()));
        }
        self.checkpoint_unsynced = false;
        self.frame_groups = true;
        for (uid, end) in std::mem::take(&mut self.checkpoint_ends) {
            if let Some(shared) = self.logs.get(&uid).and_then(|log| log.shared.as_ref()) {
                shared.checkpointed_end.store(end, Ordering::Release);
            }
        }
        if let Err(err) = self.remove_obsolete(&dir, self.journal_id) {
            tracing::warn!(error = %err, "could not remove obsolete files; will retry at the next checkpoint");
        }
        Ok(())
    }

    /// Deletes journals and checkpoints before `current`, settled segments, deleted logs.
    fn remove_obsolete(&mut self, dir: &Path, current: u64) -> std::io::Result<()> {
        let fs = self.shared.opts.fs.clone();
        let ckpt_dir = dir.join("checkpoint");
        for id in list_ids(&*fs, &ckpt_dir, ".ckpt")? {
            if id < current {
                fs.remove_file(&ckpt_dir.join(format!("{id:020}.ckpt")))?;
            }
        }
        for id in list_ids(&*fs, &dir.join("journal"), ".jnl")? {
            if id < current {
                fs.remove_file(&journal_path(dir, id))?;
            }
        }
        let mut uids: Vec<u64> = self.logs.keys().copied().collect();
        uids.sort_unstable();
        for log in uids.iter().map(|uid| &self.logs[uid]) {
            // A view's floor says nothing about its source's files.
            let Some(shared) = &log.shared else {
                continue;
            };
            let removed = shared
                .files
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove_settled(log.state.ack_floor);
            for path in removed {
                fs.remove_file(&path)?;
            }
        }
        while let Some(path) = self.deleted_dirs.pop() {
            if let Err(err) = fs.remove_dir_all(&path) {
                self.deleted_dirs.push(path);
                return Err(err);
            }
        }
        Ok(())
    }
}

/// Why a checkpoint failed: a failed fsync is fatal, any other I/O error is retried later.
#[derive(Debug)]
enum CheckpointError {
    Sync(std::io::Error),
    Io(std::io::Error),
}

impl std::fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckpointError::Sync(e) => write!(f, "fsync failed: {e}"),
            CheckpointError::Io(e) => write!(f, "{e}"),
        }
    }
}

fn op_uid(op: &Op) -> u64 {
    match op {
        Op::Append { uid, .. } | Op::Settle { uid, .. } | Op::Retry { uid, .. } => *uid,
        Op::UpdateConfig { uid, .. } | Op::DeleteLog { uid } | Op::IdWindow { uid, .. } => *uid,
        Op::CreateLog { .. } | Op::CreateView { .. } => 0,
    }
}

fn op_size(op: &Op) -> usize {
    match op {
        Op::Append { batch, .. } => batch.len() + 16,
        Op::Settle { ranges, .. } => ranges.len() * 16 + 24,
        Op::Retry { error, .. } => error.len() + 48,
        _ => 64,
    }
}

fn syncer_loop(shared: &Shared) {
    let mut n_syncs: u64 = 0;
    loop {
        let (target, journal) = {
            let mut sync = shared.sync.lock().unwrap_or_else(|e| e.into_inner());
            while sync.written_seq == sync.synced_seq && !sync.stop {
                sync = shared.sync_cv.wait(sync).unwrap_or_else(|e| e.into_inner());
            }
            if sync.written_seq == sync.synced_seq && sync.stop {
                return;
            }
            (sync.written_seq, sync.journal.clone())
        };
        if Faults::take(&shared.opts.faults.panic_syncer) {
            panic!("injected fault: the syncer thread panics");
        }
        while shared.opts.faults.stall_syncer.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let failed = if shared.poisoned.load(Ordering::SeqCst) {
            true
        } else if shared.opts.fsync
            && let Err(err) = {
                n_syncs += 1;
                match shared.opts.fail_fsync_at {
                    Some(at) if at == n_syncs => Err(std::io::Error::from_raw_os_error(libc::EIO)),
                    _ => {
                        let started = std::time::Instant::now();
                        let synced = journal.sync_data();
                        shared.fsync_latency.record(started.elapsed());
                        synced
                    }
                }
            }
        {
            // Never retry an fsync: the kernel may have dropped the dirty pages already.
            shared.poison(&format!("fdatasync of the journal failed: {err}"));
            true
        } else {
            false
        };
        if failed {
            let mut sync = shared.sync.lock().unwrap_or_else(|e| e.into_inner());
            let pending: Vec<_> = sync.pending.drain(..).collect();
            sync.synced_seq = sync.written_seq;
            drop(sync);
            // Written before the sync that failed: their outcome is unknown, not "refused".
            for (_, done, _) in pending {
                done(Err(WriteError::SyncFailed));
            }
            let mut sync = shared.sync.lock().unwrap_or_else(|e| e.into_inner());
            sync.applied_seq = sync.applied_seq.max(sync.synced_seq);
            shared.sync_cv.notify_all(); // for `Store::wait_synced`
            continue;
        }
        let mut done = Vec::new();
        let mut ends = Vec::new();
        {
            let mut sync = shared.sync.lock().unwrap_or_else(|e| e.into_inner());
            sync.synced_seq = target;
            while sync.pending.front().is_some_and(|p| p.0 <= target) {
                let (_, completion, results) = sync.pending.pop_front().unwrap();
                done.push((completion, results));
            }
            while sync.ends.front().is_some_and(|e| e.0 <= target) {
                let (_, uid, end) = sync.ends.pop_front().unwrap();
                ends.push((uid, end));
            }
        }
        if !ends.is_empty() {
            {
                let logs = shared.logs.read().unwrap_or_else(|e| e.into_inner());
                for &(uid, end) in &ends {
                    if let Some(log) = logs.get(&uid) {
                        log.durable_end.fetch_max(end, Ordering::AcqRel);
                    }
                }
            }
            if let Some(listener) = shared.listener.get() {
                listener(&ends);
            }
        }
        for (completion, results) in done {
            completion(Ok(results));
        }
        let mut sync = shared.sync.lock().unwrap_or_else(|e| e.into_inner());
        sync.applied_seq = sync.applied_seq.max(target);
        shared.sync_cv.notify_all(); // for `Store::wait_synced`
    }
}

/// Upper bounds (seconds) of the fsync latency buckets; a last one catches the rest.
pub const FSYNC_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A histogram of durations in fixed buckets, recorded without a lock.
#[derive(Debug, Default)]
struct FsyncLatency {
    buckets: [AtomicU64; FSYNC_BUCKETS.len() + 1],
    count: AtomicU64,
    micros: AtomicU64,
}

/// What `Store::fsync_latency` shows: per bucket (upper bound in seconds, infinity for the
/// last) how many fell in it (not cumulative), their count and their sum in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencySnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl FsyncLatency {
    fn record(&self, took: std::time::Duration) {
        let seconds = took.as_secs_f64();
        let i = FSYNC_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(FSYNC_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.micros.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn snapshot(&self) -> LatencySnapshot {
        let buckets = FSYNC_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect::<Vec<_>>();
        LatencySnapshot {
            count: buckets.iter().map(|(_, n)| n).sum(),
            buckets,
            sum_seconds: self.micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

#[cfg(test)]
mod fsync_latency_tests {
    use super::*;

    #[test]
    fn durations_land_in_their_buckets() {
        let h = FsyncLatency::default();
        h.record(std::time::Duration::from_micros(50));
        h.record(std::time::Duration::from_millis(3));
        h.record(std::time::Duration::from_secs(10));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.0001, 1));
        assert_eq!(s.buckets[5], (0.005, 1));
        assert_eq!(s.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert!((s.sum_seconds - 10.00305).abs() < 1e-9);
    }
}
