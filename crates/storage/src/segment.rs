//! Per-log segment files: record batches appended back to back, named by their first offset.
//! An in-memory sparse index (one entry per `INDEX_INTERVAL_BYTES`) finds a batch by offset.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{FormatError, OpenError, ReadError};
use crate::faults::FsOp;
use crate::format::{BATCH_HEADER_LEN, BatchHeader};
use crate::fs::{FileRef, Io, OpenHow};
use crate::open_files::OpenFiles;

/// Distance in bytes between sparse index entries (Kafka's `index.interval.bytes`).
pub const INDEX_INTERVAL_BYTES: u64 = 4096;
/// Most bytes read at a time from inside a batch.
const READ_CHUNK: u64 = 64 << 10;
/// Fewest bytes read at a time (below this, the system call costs more than the copy).
const MIN_READ_CHUNK: u64 = 4 << 10;

pub(crate) struct Segment {
    pub base: u64,
    /// Next offset after the last batch in this segment.
    pub end: u64,
    /// Bytes of valid batches.
    pub len: u64,
    pub path: PathBuf,
    /// This segment's number in the store's cache of open files (`Segment::file`).
    id: u64,
    files: Arc<OpenFiles>,
    /// Bytes written since the last sync (the checkpoint syncs those segments only).
    unsynced: AtomicBool,
    /// Sparse index, ascending by offset: batch starts and record marks inside batches.
    index: Vec<Mark>,
    last_indexed_pos: u64,
    /// Stream segments (Kafka batches): the time index, one entry per `index` batch mark,
    /// ascending by both fields: (the largest batch timestamp up to and including that
    /// batch, the batch's position in `index`).
    times: Vec<(i64, usize)>,
    /// The largest batch timestamp in the segment (`i64::MIN` when none).
    max_timestamp: i64,
    /// The smallest batch time (publish time; a stream batch's largest timestamp) in the
    /// segment (`i64::MAX` when none): the active segment rolls on age from it.
    first_published_ms: i64,
}

/// Where reading can start for an offset: a batch header, or a record inside a batch (so
/// that one record of a 5,000-record batch is read without the whole batch).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Mark {
    offset: u64,
    pos: u64,
    /// 0: `pos` is a batch header. Otherwise `pos` is a record of the batch that ends at
    /// this byte position and was published at `published_at_ms`.
    batch_end: u64,
    published_at_ms: i64,
}

impl Segment {
    /// A segment whose file was just opened or created (`file`, put in the cache).
    fn new(io: &Io, base: u64, path: PathBuf, file: FileRef) -> Segment {
        let id = io.files.next_id();
        io.files.put(id, file);
        Segment {
            base,
            end: base,
            len: 0,
            path,
            id,
            files: io.files.clone(),
            unsynced: AtomicBool::new(false),
            index: Vec::new(),
            last_indexed_pos: 0,
            times: Vec::new(),
            max_timestamp: i64::MIN,
            first_published_ms: i64::MAX,
        }
    }

    /// The segment's file, from the cache of open files (opened again when it left).
    pub fn file(&self, io: &Io) -> std::io::Result<FileRef> {
        self.files.get(&*io.fs, self.id, &self.path)
    }

    /// Syncs the segment's bytes when any were written since the last sync. An open that
    /// fails is `Err(Ok(_))` (nothing was lost: retry); a sync that fails is `Err(Err(_))`.
    pub fn sync_if_written(&self, io: &Io) -> Result<(), Result<std::io::Error, std::io::Error>> {
        if !self.unsynced.load(Ordering::Acquire) {
            return Ok(());
        }
        let file = self.file(io).map_err(Ok)?;
        file.sync_data().map_err(Err)?;
        self.unsynced.store(false, Ordering::Release);
        Ok(())
    }

    /// Indexes a batch at `pos` whose records are `records` (the bytes after the header).
    fn note_batch(&mut self, header: &BatchHeader, pos: u64, records: &[u8]) {
        self.first_published_ms = self.first_published_ms.min(header.published_at_ms);
        self.max_timestamp = self.max_timestamp.max(header.published_at_ms);
        if self.index.is_empty() || pos >= self.last_indexed_pos + INDEX_INTERVAL_BYTES {
            self.index.push(Mark {
                offset: header.base_offset,
                pos,
                batch_end: 0,
                published_at_ms: 0,
            });
            self.last_indexed_pos = pos;
            if header.is_kafka() {
                self.times.push((self.max_timestamp, self.index.len() - 1));
            }
        }
        if header.is_kafka() {
            // A stream batch is read whole: no marks inside it (its records are not
            // length-prefixed as tidewater records are).
            return;
        }
        // Marks inside a large batch, at record boundaries (each record starts with its
        // length, so walking them reads 4 bytes per record).
        let batch_end = pos + BATCH_HEADER_LEN as u64 + records.len() as u64;
        let mut rel = 0usize;
        let mut offset = header.base_offset;
        while rel + 4 <= records.len() {
            let record_pos = pos + BATCH_HEADER_LEN as u64 + rel as u64;
            if record_pos >= self.last_indexed_pos + INDEX_INTERVAL_BYTES {
                self.index.push(Mark {
                    offset,
                    pos: record_pos,
                    batch_end,
                    published_at_ms: header.published_at_ms,
                });
                self.last_indexed_pos = record_pos;
            }
            let len = u32::from_le_bytes(records[rel..rel + 4].try_into().unwrap()) as usize;
            rel += 4 + len;
            offset += 1;
        }
    }

    /// The largest batch timestamp in it (`i64::MIN` when none).
    pub fn max_timestamp(&self) -> i64 {
        self.max_timestamp
    }

    /// Whether a batch of time `published_at_ms` should start a new segment after this one
    /// (the active): it is `roll_ms` or more younger than the oldest batch here (Kafka's
    /// segment.ms, at append). An empty segment never rolls.
    pub(crate) fn due_to_roll(&self, published_at_ms: i64, roll_ms: u64) -> bool {
        self.len > 0
            && roll_ms > 0
            && published_at_ms.saturating_sub(self.first_published_ms)
                >= i64::try_from(roll_ms).unwrap_or(i64::MAX)
    }

    /// Bytes its in-memory indexes (offset marks and time marks) take.
    pub(crate) fn index_bytes(&self) -> usize {
        self.index.len() * std::mem::size_of::<Mark>()
            + self.times.len() * std::mem::size_of::<(i64, usize)>()
    }

    /// Halves its indexes: keeps every other offset mark (the first always) and the time
    /// marks that point at a kept one. Lookups stay correct (a mark is a place to start
    /// reading at or before an offset, a time mark a batch before the time), and read on
    /// from an earlier place. Only for sealed segments (the active one indexes as it
    /// grows). Returns whether anything was dropped.
    pub(crate) fn thin_index(&mut self) -> bool {
        if self.index.len() <= 1 {
            return false;
        }
        let index: Vec<Mark> = self.index.iter().step_by(2).copied().collect();
        self.times.retain(|&(_, at)| at % 2 == 0);
        for mark in &mut self.times {
            mark.1 /= 2;
        }
        self.index = index;
        self.times.shrink_to_fit();
        true
    }

    /// The indexed place at or before `offset` to start reading from.
    fn mark_before(&self, offset: u64) -> Mark {
        let idx = self.index.partition_point(|m| m.offset <= offset);
        if idx == 0 {
            Mark {
                offset: self.base,
                pos: 0,
                batch_end: 0,
                published_at_ms: 0,
            }
        } else {
            self.index[idx - 1]
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // Gone from its log (removed, replaced): a removed file's space is not held open.
        self.files.forget(self.id);
    }
}

/// The segments of one log. Shared by the writer (appends) and readers behind an RwLock;
/// file I/O happens outside the lock on `FileRef` handles.
pub(crate) struct LogFiles {
    pub uid: u64,
    pub dir: PathBuf,
    pub segments: Vec<Segment>,
    /// Offsets between segments that no file holds and that were accepted at open
    /// (settled, or dropped by a repair); reads step over them and over nothing else.
    holes: Vec<Range<u64>>,
    io: Io,
}

/// Offsets that the checkpoint says a log holds and its files do not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Gap {
    pub offsets: Range<u64>,
    /// The file or directory where they should be.
    pub path: PathBuf,
    pub detail: String,
}

/// What opening a log's files found.
pub(crate) enum Opened {
    /// The files, and the gaps accepted as holes.
    Files(LogFiles, Vec<Gap>),
    /// Gaps not accepted; nothing was changed on disk.
    Missing(Vec<Gap>),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct SegmentMark {
    base: u64,
    len: u64,
    end: u64,
    index_len: usize,
    max_timestamp: i64,
    first_published_ms: i64,
}

pub(crate) fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.seg"))
}

/// Suffix of a compacted segment being written; one found at open is a rewrite that never
/// took the place of the segments it was for, and is removed.
const COMPACTING_SUFFIX: &str = ".seg.compacting";

pub(crate) fn compacting_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}{COMPACTING_SUFFIX}"))
}

/// A new segment file being written beside a log's segments, to take the place of a run of
/// sealed ones (compaction): stream batches, each starting where the one before ended.
pub(crate) struct SegmentWriter {
    pub segment: Segment,
    uid: u64,
    buf: Vec<u8>,
    io: Io,
}

/// Bytes buffered before a write to the new file.
const WRITER_CHUNK: usize = 1 << 20;

impl SegmentWriter {
    pub fn create(io: &Io, dir: &Path, uid: u64, base: u64) -> std::io::Result<SegmentWriter> {
        let path = compacting_path(dir, base);
        let file = io.fs.open(&path, OpenHow::CREATE_TRUNCATE)?;
        io.faults.note(|| FsOp::CreateFile(path.clone()));
        Ok(SegmentWriter {
            segment: Segment::new(io, base, path, file),
            uid,
            buf: Vec::new(),
            io: io.clone(),
        })
    }

    /// Adds one Kafka batch whose base offset is where the segment so far ends.
    pub fn push(&mut self, kafka_batch: &[u8]) -> std::io::Result<()> {
        let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
        let mut wrapped = crate::format::wrap_kafka_batch(self.uid, kafka_batch)
            .map_err(|e| invalid(format!("a rewritten batch: {e}")))?;
        let inner = crate::format::kafka::check_kafka_batch(kafka_batch)
            .map_err(|e| invalid(format!("a rewritten batch: {e}")))?;
        if u64::try_from(inner.base_offset).ok() != Some(self.segment.end) {
            return Err(invalid(format!(
                "a rewritten batch starts at offset {}, the segment so far ends at {}",
                inner.base_offset, self.segment.end
            )));
        }
        crate::format::stamp_batch(&mut wrapped, self.segment.end);
        let header = BatchHeader::decode(&wrapped).map_err(|e| invalid(e.to_string()))?;
        let pos = self.segment.len;
        self.segment
            .note_batch(&header, pos, &wrapped[BATCH_HEADER_LEN..]);
        self.segment.len += wrapped.len() as u64;
        self.segment.end += u64::from(header.count);
        self.buf.extend_from_slice(&wrapped);
        if self.buf.len() >= WRITER_CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let at = self.segment.len - self.buf.len() as u64;
        self.segment.file(&self.io)?.write_all_at(&self.buf, at)?;
        self.buf.clear();
        Ok(())
    }

    /// Writes what is buffered and, with `fsync`, makes the file's bytes durable.
    pub fn finish(mut self, fsync: bool) -> std::io::Result<Segment> {
        self.flush()?;
        if fsync {
            self.segment.file(&self.io)?.sync_all()?;
            let path = self.segment.path.clone();
            self.io.faults.note(|| FsOp::SyncFile(path));
        }
        Ok(self.segment)
    }

    /// Abandons the file.
    pub fn discard(self) {
        let path = self.segment.path.clone();
        let io = self.io.clone();
        drop(self);
        let _ = io.fs.remove_file(&path);
    }
}

fn open_rw(io: &Io, path: &Path, create: bool) -> Result<FileRef, std::io::Error> {
    let how = if create {
        OpenHow::CREATE
    } else {
        OpenHow::READ_WRITE
    };
    io.fs.open(path, how)
}

/// Makes the names in `dir` durable (created, renamed and removed files).
pub(crate) fn fsync_dir(io: &Io, dir: &Path) -> std::io::Result<()> {
    io.fs.open_dir(dir)?.sync_all()?;
    io.faults.note(|| FsOp::SyncDir(dir.to_path_buf()));
    Ok(())
}

/// Removes a file, noting it for tests.
fn remove_file(io: &Io, path: &Path) -> std::io::Result<()> {
    io.fs.remove_file(path)?;
    io.faults.note(|| FsOp::Remove(path.to_path_buf()));
    Ok(())
}

impl LogFiles {
    /// Creates the directory (durably: its parent is fsynced) and its first segment.
    pub fn create(
        dir: PathBuf,
        uid: u64,
        first_offset: u64,
        io: Io,
    ) -> Result<LogFiles, OpenError> {
        io.fs
            .create_dir_all(&dir)
            .map_err(|e| OpenError::io(&dir, e))?;
        io.faults.note(|| FsOp::CreateDir(dir.clone()));
        if let Some(parent) = dir.parent() {
            fsync_dir(&io, parent).map_err(|e| OpenError::io(parent, e))?;
        }
        let mut files = LogFiles {
            uid,
            dir,
            segments: Vec::new(),
            holes: Vec::new(),
            io,
        };
        files
            .roll(first_offset)
            .map_err(|e| OpenError::io(&files.dir, e))?;
        Ok(files)
    }

    /// Opens a log's directory, checking every batch, and compares what the files hold
    /// with what the last checkpoint says the log holds: offsets `from` (its ack floor) up
    /// to `floor` (its end). Offsets at or above `floor` are in the journal too, so a bad or
    /// torn batch there truncates the log (later segments are removed) for the journal to
    /// refill. Offsets below it that no file holds (a missing directory, missing segment
    /// files at the start or in the middle, a segment shorter than its content) are a `Gap`:
    /// one that `hole_ok` accepts (nothing unsettled is in it, or the operator asked for a
    /// repair) becomes a hole that reads step over; any other makes this return
    /// `Opened::Missing`, having changed nothing on disk.
    pub fn open(
        dir: PathBuf,
        uid: u64,
        (from, floor): (u64, u64),
        io: Io,
        hole_ok: &dyn Fn(&Range<u64>) -> bool,
    ) -> Result<Opened, OpenError> {
        let from = from.min(floor);
        if !io.fs.exists(&dir) {
            let gap = Gap {
                offsets: from..floor,
                path: dir.clone(),
                detail: "the log's directory is missing".into(),
            };
            if !gap.offsets.is_empty() && !hole_ok(&gap.offsets) {
                return Ok(Opened::Missing(vec![gap]));
            }
            let mut files = LogFiles::create(dir, uid, floor, io)?;
            let gaps = if gap.offsets.is_empty() {
                Vec::new()
            } else {
                files.holes.push(gap.offsets.clone());
                vec![gap]
            };
            return Ok(Opened::Files(files, gaps));
        }
        let mut bases: Vec<u64> = Vec::new();
        let mut unfinished: Vec<PathBuf> = Vec::new();
        for name in io.fs.read_dir(&dir).map_err(|e| OpenError::io(&dir, e))? {
            let name = name.to_string_lossy();
            if let Some(stem) = name.strip_suffix(".seg")
                && let Ok(base) = stem.parse::<u64>()
            {
                bases.push(base);
            } else if name.ends_with(COMPACTING_SUFFIX) {
                unfinished.push(dir.join(&*name));
            }
        }
        unfinished.sort();
        bases.sort_unstable();
        let mut files = LogFiles {
            uid,
            dir,
            segments: Vec::new(),
            holes: Vec::new(),
            io,
        };
        // Changes are applied only once nothing is refused.
        let mut truncate: Vec<(usize, u64)> = Vec::new();
        let mut remove: Vec<PathBuf> = unfinished;
        let (mut gaps, mut refused) = (Vec::new(), Vec::new());
        let mut note_gap = |gap: Gap| {
            if hole_ok(&gap.offsets) {
                gaps.push(gap);
            } else {
                refused.push(gap);
            }
        };
        let mut cut = false;
        for base in bases {
            let path = segment_path(&files.dir, base);
            if cut {
                remove.push(path);
                continue;
            }
            let name = |p: &Path| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .to_string()
            };
            match files.segments.last() {
                Some(prev) if base < prev.end => {
                    // A segment that a compaction merged into the one before, whose
                    // removal a power loss undid: every offset it holds is there too.
                    let within = base > prev.base
                        && scan_segment(&files.io, &path, uid, base)
                            .is_ok_and(|s| s.end <= prev.end);
                    if within {
                        remove.push(path);
                        continue;
                    }
                    return Err(OpenError::Corrupt {
                        path,
                        position: 0,
                        reason: format!("segment starts at offset {base}, expected {}", prev.end),
                    });
                }
                Some(prev) if base > prev.end && prev.end >= floor => {
                    // Past the checkpointed end: the journal has it.
                    cut = true;
                    remove.push(path);
                    continue;
                }
                Some(prev) if base > prev.end => {
                    if base > floor {
                        // What is below `floor` is reported as the log's short end.
                        cut = true;
                        remove.push(path);
                        continue;
                    }
                    let lost = prev.end.max(from)..base;
                    if !lost.is_empty() {
                        note_gap(Gap {
                            offsets: lost,
                            path: prev.path.clone(),
                            detail: format!(
                                "segment {} ends at offset {}, the next file is {}",
                                name(&prev.path),
                                prev.end,
                                name(&path)
                            ),
                        });
                    }
                    files.holes.push(prev.end..base);
                }
                None if base > from => {
                    if base > floor {
                        cut = true;
                        remove.push(path);
                        continue;
                    }
                    note_gap(Gap {
                        offsets: from..base,
                        path: files.dir.clone(),
                        detail: format!(
                            "no segment file holds offsets from {from} on (the first is {})",
                            name(&path)
                        ),
                    });
                }
                _ => {}
            }
            let segment = scan_segment(&files.io, &path, uid, base)?;
            let physical = segment
                .file(&files.io)
                .and_then(|f| f.size())
                .map_err(|e| OpenError::io(&path, e))?;
            if physical != segment.len {
                if segment.end >= floor {
                    tracing::warn!(path = %path.display(), valid = segment.len, physical, "truncating torn segment tail");
                    cut = true;
                } else {
                    // Short of its content: the offsets after its valid batches are a gap
                    // (found with the next file, or at the log's end).
                    tracing::error!(path = %path.display(), valid = segment.len, physical, end = segment.end, "invalid batch below the checkpointed end");
                }
                truncate.push((files.segments.len(), segment.len));
            }
            files.segments.push(segment);
        }
        let end = files.segments.last().map_or(from, |s| s.end.max(from));
        if end < floor {
            let detail = match files.segments.last() {
                Some(last) => format!(
                    "the last valid batch of {} ends at offset {}, the log ends at {floor}",
                    last.path.file_name().unwrap_or_default().to_string_lossy(),
                    last.end
                ),
                None => "no segment files".into(),
            };
            note_gap(Gap {
                offsets: end..floor,
                path: files
                    .segments
                    .last()
                    .map_or(files.dir.clone(), |s| s.path.clone()),
                detail,
            });
        }
        if !refused.is_empty() {
            return Ok(Opened::Missing(refused));
        }
        for (idx, len) in truncate {
            let segment = &files.segments[idx];
            let file = segment
                .file(&files.io)
                .map_err(|e| OpenError::io(&segment.path, e))?;
            file.set_len(len)
                .map_err(|e| OpenError::io(&segment.path, e))?;
            file.sync_all()
                .map_err(|e| OpenError::io(&segment.path, e))?;
        }
        for path in &remove {
            remove_file(&files.io, path).map_err(|e| OpenError::io(path, e))?;
        }
        if !remove.is_empty() {
            // Removed segments must not come back after a power loss, behind the cut.
            fsync_dir(&files.io, &files.dir).map_err(|e| OpenError::io(&files.dir, e))?;
        }
        if files.end() < floor {
            // An accepted gap at the end: the journal appends from `floor` on.
            if let Some(last) = files.segments.last() {
                files.holes.push(last.end..floor);
            }
            files
                .roll(floor)
                .map_err(|e| OpenError::io(&files.dir, e))?;
        } else if files.segments.is_empty() {
            files
                .roll(floor)
                .map_err(|e| OpenError::io(&files.dir, e))?;
        }
        Ok(Opened::Files(files, gaps))
    }

    /// Whether offsets `range` between two segments are a known hole (accepted at open).
    pub fn is_hole(&self, range: &Range<u64>) -> bool {
        self.holes
            .iter()
            .any(|h| h.start <= range.start && range.end <= h.end)
    }

    pub fn end(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.end)
    }

    pub fn active(&self) -> &Segment {
        self.segments
            .last()
            .expect("a log always has an active segment")
    }

    /// The active segment's file (from the cache of open files).
    pub fn active_file(&self) -> std::io::Result<FileRef> {
        self.active().file(&self.io)
    }

    /// Starts a new active segment at `base` (the current end).
    pub fn roll(&mut self, base: u64) -> std::io::Result<()> {
        let path = segment_path(&self.dir, base);
        let file = open_rw(&self.io, &path, true)?;
        self.io.faults.note(|| FsOp::CreateFile(path.clone()));
        file.set_len(0)?;
        fsync_dir(&self.io, &self.dir)?;
        let segment = Segment::new(&self.io, base, path, file);
        segment.unsynced.store(true, Ordering::Release);
        self.segments.push(segment);
        Ok(())
    }

    /// Records batches just written at the end of the active segment.
    /// Indexes batches just written at the end of the active segment (`bytes`, back to
    /// back, checked by the caller).
    pub fn note_appended(&mut self, bytes: &[u8], new_len: u64, new_end: u64) {
        let active = self.segments.last_mut().expect("active segment");
        let start = active.len;
        let mut at = 0;
        while at < bytes.len() {
            let Ok(header) = BatchHeader::decode(&bytes[at..]) else {
                break;
            };
            let total = header.total_len();
            let records = &bytes[at + BATCH_HEADER_LEN..at + total];
            active.note_batch(&header, start + at as u64, records);
            at += total;
        }
        active.len = new_len;
        active.end = new_end;
        active.unsynced.store(true, Ordering::Release);
    }

    /// Cuts the log back to end at `offset` (a batch boundary). Used on recovery when a
    /// segment holds batches whose journal entries never became durable.
    pub fn truncate_to(&mut self, offset: u64) -> Result<(), OpenError> {
        let mut removed = false;
        while self.segments.len() > 1 && self.active().base >= offset {
            let seg = self.segments.pop().unwrap();
            remove_file(&self.io, &seg.path).map_err(|e| OpenError::io(&seg.path, e))?;
            removed = true;
        }
        if removed {
            fsync_dir(&self.io, &self.dir).map_err(|e| OpenError::io(&self.dir, e))?;
        }
        let active = self.segments.last_mut().unwrap();
        if active.end == offset {
            return Ok(());
        }
        let rescanned =
            scan_segment_until(&self.io, &active.path, self.uid, active.base, Some(offset))?;
        if rescanned.end != offset {
            return Err(OpenError::Corrupt {
                path: active.path.clone(),
                position: rescanned.len,
                reason: format!("no batch boundary at offset {offset}"),
            });
        }
        let file = rescanned
            .file(&self.io)
            .map_err(|e| OpenError::io(&rescanned.path, e))?;
        file.set_len(rescanned.len)
            .map_err(|e| OpenError::io(&rescanned.path, e))?;
        file.sync_all()
            .map_err(|e| OpenError::io(&rescanned.path, e))?;
        *active = rescanned;
        Ok(())
    }

    /// Puts `segment` (written by a `SegmentWriter`, its file synced) in the place of the
    /// sealed segments that hold exactly its offsets, by renaming its file over the first
    /// one's. `None` when no such run of sealed segments is here any more (retention removed
    /// some, say): nothing changed. Otherwise the paths of the other segments replaced, for
    /// the caller to remove once the rename is durable (a power loss before that keeps the
    /// old files, which hold the same offsets: the open tells them apart).
    pub fn replace(&mut self, mut segment: Segment) -> std::io::Result<Option<Vec<PathBuf>>> {
        let n = self.segments.len();
        let Some(first) = self.segments.iter().position(|s| s.base == segment.base) else {
            return Ok(None);
        };
        let Some(last) = self.segments[first..]
            .iter()
            .position(|s| s.end == segment.end)
            .map(|i| first + i)
        else {
            return Ok(None);
        };
        if last + 1 >= n {
            return Ok(None); // the active segment is never rewritten
        }
        let path = segment_path(&self.dir, segment.base);
        self.io.fs.rename(&segment.path, &path)?;
        self.io.faults.note(|| FsOp::Rename {
            from: segment.path.clone(),
            to: path.clone(),
        });
        segment.path = path;
        let replaced: Vec<Segment> = self
            .segments
            .splice(first..=last, std::iter::once(segment))
            .collect();
        Ok(Some(
            replaced.iter().skip(1).map(|s| s.path.clone()).collect(),
        ))
    }

    /// Removes sealed segments whose every offset is below `floor`; returns their paths.
    pub fn remove_settled(&mut self, floor: u64) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        while self.segments.len() > 1 && self.segments[0].end <= floor {
            removed.push(self.segments.remove(0).path.clone());
        }
        removed
    }

    /// Where the log ends now, to undo an append that failed half-way.
    pub fn mark(&self) -> SegmentMark {
        let active = self.active();
        SegmentMark {
            base: active.base,
            len: active.len,
            end: active.end,
            index_len: active.index.len(),
            max_timestamp: active.max_timestamp,
            first_published_ms: active.first_published_ms,
        }
    }

    /// Undoes every append after `mark`: removes segments rolled since and cuts the file.
    pub fn rollback(&mut self, mark: SegmentMark) -> std::io::Result<()> {
        while self.segments.len() > 1 && self.active().base > mark.base {
            let seg = self.segments.pop().unwrap();
            self.io.fs.remove_file(&seg.path)?;
        }
        let active = self.segments.last_mut().unwrap();
        active.len = mark.len;
        active.end = mark.end;
        active.index.truncate(mark.index_len);
        active.times.retain(|&(_, at)| at < mark.index_len);
        active.max_timestamp = mark.max_timestamp;
        active.first_published_ms = mark.first_published_ms;
        active.last_indexed_pos = active.index.last().map_or(0, |m| m.pos);
        active.unsynced.store(true, Ordering::Release);
        active.file(&self.io)?.set_len(mark.len)
    }

    pub fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }
}

fn scan_segment(io: &Io, path: &Path, uid: u64, base: u64) -> Result<Segment, OpenError> {
    scan_segment_until(io, path, uid, base, None)
}

/// Walks a segment's batches from the start, stopping at the first invalid one (or at
/// `stop_at` offset). Returns the segment with `len` = bytes of valid batches.
fn scan_segment_until(
    io: &Io,
    path: &Path,
    uid: u64,
    base: u64,
    stop_at: Option<u64>,
) -> Result<Segment, OpenError> {
    let file = open_rw(io, path, false).map_err(|e| OpenError::io(path, e))?;
    let physical = file.size().map_err(|e| OpenError::io(path, e))?;
    let mut segment = Segment::new(io, base, path.to_path_buf(), file.clone());
    // Its bytes may be in the page cache only (the process stopped before a checkpoint
    // synced them): the first checkpoint syncs them.
    segment.unsynced.store(true, Ordering::Release);
    let mut header_buf = [0u8; BATCH_HEADER_LEN];
    let mut body = Vec::new();
    while segment.len + BATCH_HEADER_LEN as u64 <= physical {
        if stop_at.is_some_and(|stop| segment.end >= stop) {
            break;
        }
        let pos = segment.len;
        if file.read_exact_at(&mut header_buf, pos).is_err() {
            break;
        }
        let Ok(header) = BatchHeader::decode(&header_buf) else {
            break;
        };
        if header.log_uid != uid || header.base_offset != segment.end {
            break;
        }
        if pos + header.total_len() as u64 > physical {
            break;
        }
        body.resize(header.body_len as usize, 0);
        if file
            .read_exact_at(&mut body, pos + BATCH_HEADER_LEN as u64)
            .is_err()
        {
            break;
        }
        if crate::format::check_body(&header, &body).is_err() {
            break;
        }
        segment.note_batch(&header, pos, &body);
        segment.len = pos + header.total_len() as u64;
        segment.end = header.base_offset + header.count as u64;
    }
    Ok(segment)
}

/// Where a read of offset `next` (below `limit`) goes on.
enum Locate {
    /// Into this segment (by index), which holds `next`.
    In(usize),
    /// On from this offset: `next` was deleted (settled, below the first segment) or is in a
    /// hole accepted at open.
    Skip(u64),
    /// Nowhere: nothing at or after `next` yet.
    End,
}

fn locate(files: &LogFiles, next: u64, limit: u64) -> Result<Locate, ReadError> {
    let idx = files.segments.partition_point(|s| s.base <= next);
    if idx == 0 {
        // Below the first segment: those offsets were deleted (settled); skip ahead.
        return Ok(match files.segments.first() {
            Some(first) if first.base < limit && first.base > next => Locate::Skip(first.base),
            _ => Locate::End,
        });
    }
    let seg = &files.segments[idx - 1];
    if next < seg.end {
        return Ok(Locate::In(idx - 1));
    }
    match files.segments.get(idx) {
        Some(following) => {
            let between = seg.end..following.base;
            if !between.is_empty() && !files.is_hole(&between) {
                // Never taken for settled: only holes accepted at open are.
                return Err(ReadError::Missing {
                    path: seg.path.clone(),
                    offsets: between,
                });
            }
            Ok(Locate::Skip(following.base))
        }
        None => Ok(Locate::End),
    }
}

/// What a read does with each wanted record: gets its bytes (length prefix included),
/// offset and publish time; `Ok(false)` ends the read.
pub(crate) type Sink<'s> = &'s mut dyn FnMut(&[u8], u64, i64) -> Result<bool, FormatError>;

/// Hands records `[from, limit)` of a log to `sink`, at most `max_count` of them and about
/// `max_bytes` (at least one record when one exists). Returns the bytes read from files.
///
/// Starts at the sparse index entry before `from`, skips batches with nothing wanted by
/// their header, and reads inside a batch about as far as the wanted records reach, so a
/// one-record read costs a pread of a few KiB. Only records whose offset `want` accepts
/// reach the sink (the others are stepped over by their length).
pub(crate) fn read_records(
    files: &std::sync::RwLock<LogFiles>,
    from: u64,
    limit: u64,
    max_count: usize,
    max_bytes: usize,
    want: &dyn Fn(u64) -> bool,
    sink: Sink<'_>,
) -> Result<u64, ReadError> {
    let bytes_read = std::cell::Cell::new(0u64);
    let count_read = |n: usize| bytes_read.set(bytes_read.get() + n as u64);
    let mut next = from;
    let mut bytes = 0usize;
    let mut count = 0usize;
    let full = |count: usize, bytes: usize| count >= max_count || (bytes >= max_bytes && count > 0);
    let mut header_buf = [0u8; BATCH_HEADER_LEN];
    let mut chunk = ReadBuffer::take();
    // Bytes read and records stepped over, for sizing chunks to what is still wanted.
    let (mut seen_bytes, mut seen_records) = (0u64, 0u64);
    while next < limit && !full(count, bytes) {
        let (file, path, mark, seg_len, seg_end, seg_records) = {
            let files = files.read().unwrap_or_else(|e| e.into_inner());
            let seg = match locate(&files, next, limit)? {
                Locate::In(idx) => &files.segments[idx],
                Locate::Skip(to) => {
                    next = to;
                    continue;
                }
                Locate::End => return Ok(bytes_read.get()),
            };
            let file = seg.file(&files.io).map_err(|source| ReadError::Io {
                path: seg.path.clone(),
                source,
            })?;
            (
                file,
                seg.path.clone(),
                seg.mark_before(next),
                seg.len,
                seg.end,
                seg.end - seg.base,
            )
        };
        let io = |source| ReadError::Io {
            path: path.clone(),
            source,
        };
        let mut pos = mark.pos;
        // (end of the batch's bytes, its publish time, the offset of the record at `pos`)
        let mut in_batch =
            (mark.batch_end != 0).then_some((mark.batch_end, mark.published_at_ms, mark.offset));
        while pos < seg_len && next < limit && !full(count, bytes) {
            let (batch_end, published_at_ms, mut offset) = match in_batch.take() {
                Some(batch) => batch,
                None => {
                    file.read_exact_at(&mut header_buf, pos).map_err(io)?;
                    count_read(BATCH_HEADER_LEN);
                    let header = BatchHeader::decode(&header_buf)
                        .map_err(|reason| corrupt(&path, pos, reason))?;
                    if header.is_kafka() {
                        return Err(corrupt(&path, pos, FormatError::WrongBatchKind));
                    }
                    let total = header.total_len() as u64;
                    if header.base_offset + header.count as u64 <= next {
                        pos += total; // nothing wanted in this batch
                        continue;
                    }
                    let batch = (pos + total, header.published_at_ms, header.base_offset);
                    pos += BATCH_HEADER_LEN as u64;
                    batch
                }
            };
            // The batch's records, a chunk at a time: each starts with its length, so
            // records before `next` are stepped over without decoding. (The header CRC
            // was checked; the body's when the batch entered this process: at append, or
            // in the scan at open. Re-hashing a batch per read dominated reads.)
            while pos < batch_end {
                // Read about as far as the records still wanted reach (from `pos`, which
                // may be a record mark before `next`), estimated from the sizes seen so
                // far: a read of a few offsets must not copy a whole chunk past them.
                let records_left = limit
                    .min(next.saturating_add(max_count.saturating_sub(count) as u64))
                    .saturating_sub(offset);
                // (Until this read has seen records, the segment's average size.)
                let avg = match seen_records {
                    0 => seg_len.div_ceil(seg_records.max(1)),
                    n => seen_bytes.div_ceil(n),
                };
                let chunk_size = records_left
                    .saturating_mul(avg + avg / 4)
                    .clamp(MIN_READ_CHUNK, READ_CHUNK);
                let mut filled = crate::usize_of((batch_end - pos).min(chunk_size));
                // The buffer only grows (no zero-filling per read); `filled` bytes are valid.
                if chunk.len() < filled {
                    chunk.resize(filled, 0);
                }
                file.read_exact_at(&mut chunk[..filled], pos).map_err(io)?;
                count_read(filled);
                let mut rel = 0usize;
                while rel + 4 <= filled {
                    let len = u32::from_le_bytes(chunk[rel..rel + 4].try_into().unwrap()) as usize;
                    let record_len = 4 + len;
                    if rel + record_len > filled {
                        if rel > 0 {
                            break; // read the rest from this record on
                        }
                        // One record larger than a chunk: read it whole.
                        if pos + record_len as u64 > batch_end {
                            return Err(corrupt(&path, pos, FormatError::BadLength));
                        }
                        if chunk.len() < record_len {
                            chunk.resize(record_len, 0);
                        }
                        file.read_exact_at(&mut chunk[..record_len], pos)
                            .map_err(io)?;
                        count_read(record_len);
                        filled = record_len;
                        continue;
                    }
                    if offset >= next {
                        // Past the end whether wanted or not (an unwanted record past
                        // `limit` used to keep the read going to the end of its batch).
                        if offset >= limit || full(count, bytes) {
                            return Ok(bytes_read.get());
                        }
                        next = offset + 1;
                        if want(offset) {
                            let go_on =
                                sink(&chunk[rel..rel + record_len], offset, published_at_ms)
                                    .map_err(|reason| corrupt(&path, pos + rel as u64, reason))?;
                            bytes += record_len;
                            count += 1;
                            if !go_on {
                                return Ok(bytes_read.get());
                            }
                        }
                    }
                    rel += record_len;
                    offset += 1;
                    seen_records += 1;
                }
                if rel == 0 {
                    return Err(corrupt(&path, pos, FormatError::Truncated));
                }
                seen_bytes += rel as u64;
                pos += rel as u64;
            }
            if pos != batch_end {
                return Err(corrupt(&path, pos, FormatError::BadLength));
            }
            next = next.max(offset.min(limit));
        }
        if next < seg_end && pos >= seg_len {
            return Ok(bytes_read.get()); // the segment ended early (being appended): nothing more yet
        }
    }
    Ok(bytes_read.get())
}

/// A stream batch as stored: its offsets and max timestamp (from the tidewater header) and
/// the Kafka record batch a fetch hands out unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBatch {
    pub base_offset: u64,
    /// Offsets it spans (its records may skip some).
    pub span: u32,
    pub max_timestamp: i64,
    pub kafka: bytes::Bytes,
}

/// Whole stream batches holding offsets `[from, limit)`, from the one holding `from` (it may
/// start before it) on, until about `max_bytes` are taken (at least one batch when one
/// exists). Returns the bytes read from files.
pub(crate) fn read_batches(
    files: &std::sync::RwLock<LogFiles>,
    from: u64,
    limit: u64,
    max_bytes: usize,
    out: &mut Vec<StoredBatch>,
) -> Result<u64, ReadError> {
    let mut bytes_read = 0u64;
    let mut taken = 0usize;
    let mut next = from;
    let mut header_buf = [0u8; BATCH_HEADER_LEN];
    let start = out.len();
    while next < limit && (out.len() == start || taken < max_bytes) {
        let (file, path, mark_pos, seg_len, seg_end) = {
            let files = files.read().unwrap_or_else(|e| e.into_inner());
            let seg = match locate(&files, next, limit)? {
                Locate::In(idx) => &files.segments[idx],
                Locate::Skip(to) => {
                    next = to;
                    continue;
                }
                Locate::End => return Ok(bytes_read),
            };
            let file = seg.file(&files.io).map_err(|source| ReadError::Io {
                path: seg.path.clone(),
                source,
            })?;
            let mark = seg.mark_before(next);
            (file, seg.path.clone(), mark.pos, seg.len, seg.end)
        };
        let io = |source| ReadError::Io {
            path: path.clone(),
            source,
        };
        let mut pos = mark_pos;
        while pos < seg_len && next < limit && (out.len() == start || taken < max_bytes) {
            file.read_exact_at(&mut header_buf, pos).map_err(io)?;
            bytes_read += BATCH_HEADER_LEN as u64;
            let header =
                BatchHeader::decode(&header_buf).map_err(|reason| corrupt(&path, pos, reason))?;
            if !header.is_kafka() {
                return Err(corrupt(&path, pos, FormatError::WrongBatchKind));
            }
            let total = header.total_len() as u64;
            let end = header.base_offset + u64::from(header.count);
            if end <= next {
                pos += total; // before `from`
                continue;
            }
            if header.base_offset >= limit {
                return Ok(bytes_read);
            }
            let mut body = vec![0; header.body_len as usize];
            file.read_exact_at(&mut body, pos + BATCH_HEADER_LEN as u64)
                .map_err(io)?;
            bytes_read += body.len() as u64;
            taken += body.len();
            out.push(StoredBatch {
                base_offset: header.base_offset,
                span: header.count,
                max_timestamp: header.published_at_ms,
                kafka: bytes::Bytes::from(body),
            });
            next = end;
            pos += total;
        }
        if next < seg_end && pos >= seg_len {
            return Ok(bytes_read); // being appended: nothing more yet
        }
    }
    Ok(bytes_read)
}

/// The base offset of the first stream batch whose max timestamp is at least `timestamp`
/// (its records may hold the first such offset), or `None` when no batch is that late.
/// (Timestamps need not rise from batch to batch: the time index keeps the largest so far,
/// as Kafka's does.)
pub(crate) fn find_time(
    files: &std::sync::RwLock<LogFiles>,
    timestamp: i64,
) -> Result<Option<u64>, ReadError> {
    let (file, path, from_pos, seg_len) = {
        let files = files.read().unwrap_or_else(|e| e.into_inner());
        let Some(seg) = files.segments.iter().find(|s| s.max_timestamp >= timestamp) else {
            return Ok(None);
        };
        // The first time mark at or past the timestamp; the batch is after the one before.
        let at = seg.times.partition_point(|&(max, _)| max < timestamp);
        let from_pos = match at {
            0 => 0,
            n => seg.index[seg.times[n - 1].1].pos,
        };
        let file = seg.file(&files.io).map_err(|source| ReadError::Io {
            path: seg.path.clone(),
            source,
        })?;
        (file, seg.path.clone(), from_pos, seg.len)
    };
    let mut header_buf = [0u8; BATCH_HEADER_LEN];
    let mut pos = from_pos;
    while pos < seg_len {
        file.read_exact_at(&mut header_buf, pos)
            .map_err(|source| ReadError::Io {
                path: path.clone(),
                source,
            })?;
        let header =
            BatchHeader::decode(&header_buf).map_err(|reason| corrupt(&path, pos, reason))?;
        if header.published_at_ms >= timestamp {
            return Ok(Some(header.base_offset));
        }
        pos += header.total_len() as u64;
    }
    Ok(None)
}

thread_local! {
    /// One read buffer per thread, kept between reads so it is not zero-filled each time.
    static READ_BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The thread's read buffer, given back when dropped.
struct ReadBuffer(Vec<u8>);

impl ReadBuffer {
    fn take() -> ReadBuffer {
        ReadBuffer(READ_BUFFER.with(|b| b.take()))
    }
}

impl Drop for ReadBuffer {
    fn drop(&mut self) {
        // Keep at most a few chunks' worth (one huge record must not pin memory).
        if self.0.len() <= 4 * crate::usize_of(READ_CHUNK) {
            READ_BUFFER.with(|b| b.set(std::mem::take(&mut self.0)));
        }
    }
}

impl std::ops::Deref for ReadBuffer {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl std::ops::DerefMut for ReadBuffer {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

fn corrupt(path: &Path, position: u64, reason: FormatError) -> ReadError {
    ReadError::Corrupt {
        path: path.to_path_buf(),
        position,
        reason,
    }
}
