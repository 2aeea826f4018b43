//! The segment files held open: a bounded cache of file descriptors, least recently used
//! first out, so that the number of logs and segments is not limited by the process's
//! open-files limit (10,000 queues used to hold 20,000 descriptors for as long as they
//! lived).
//!
//! A segment asks the cache for its file each time it does I/O (`OpenFiles::get`); a
//! miss opens it through the `Fs` seam. Past `capacity`, the least recently used file
//! leaves the cache; a reader or the writer still using it keeps it open (a `FileRef` is
//! shared) until done, so descriptors in use are at most `capacity` plus one per thread
//! doing segment I/O. A segment that leaves its log (removed, replaced) forgets its entry
//! at once, so the disk space of a removed file is not held by the cache.
//!
//! A file closed with bytes not yet synced is synced later through a descriptor opened
//! after the write: Linux (4.16 and later: "errseq: Always report a writeback error once")
//! reports a writeback error to the first fsync of a descriptor opened after it when no
//! fsync has reported it yet, so closing loses no error (the checkpoint syncs every
//! segment written since the last one).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::fs::{FileRef, Fs, OpenHow};

/// The least this cache holds (a log's active segment and a reader's segment, with room).
pub const MIN_OPEN_SEGMENT_FILES: usize = 16;

/// A bounded, least-recently-used cache of open segment files, keyed by segment id (a
/// number given to each segment of this store, never reused).
pub(crate) struct OpenFiles {
    capacity: usize,
    inner: Mutex<Lru>,
    next_id: AtomicU64,
    opens: AtomicU64,
    closes: AtomicU64,
}

#[derive(Default)]
struct Lru {
    /// id -> (file, last use)
    files: HashMap<u64, (FileRef, u64)>,
    /// last use -> id, oldest first.
    by_use: BTreeMap<u64, u64>,
    clock: u64,
}

impl Lru {
    fn touch(&mut self, id: u64) -> Option<FileRef> {
        let (file, used) = self.files.get_mut(&id)?;
        self.by_use.remove(used);
        self.clock += 1;
        *used = self.clock;
        self.by_use.insert(self.clock, id);
        Some(file.clone())
    }

    fn insert(&mut self, id: u64, file: FileRef) {
        self.clock += 1;
        if let Some((_, used)) = self.files.insert(id, (file, self.clock)) {
            self.by_use.remove(&used);
        }
        self.by_use.insert(self.clock, id);
    }

    fn remove(&mut self, id: u64) -> Option<FileRef> {
        let (file, used) = self.files.remove(&id)?;
        self.by_use.remove(&used);
        Some(file)
    }

    /// The least recently used entry, taken out.
    fn pop_oldest(&mut self) -> Option<FileRef> {
        let (_, id) = self.by_use.pop_first()?;
        self.files.remove(&id).map(|(file, _)| file)
    }
}

impl OpenFiles {
    pub fn new(capacity: usize) -> OpenFiles {
        OpenFiles {
            capacity: capacity.max(1),
            inner: Mutex::new(Lru::default()),
            next_id: AtomicU64::new(1),
            opens: AtomicU64::new(0),
            closes: AtomicU64::new(0),
        }
    }

    /// A new segment id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Segment `id`'s file at `path`, opened for reading and writing when not cached.
    pub fn get(&self, fs: &dyn Fs, id: u64, path: &Path) -> io::Result<FileRef> {
        if let Some(file) = self.lock().touch(id) {
            return Ok(file);
        }
        // Opened outside the lock: an open is a system call, and other segments' I/O
        // need not wait for it. (Two threads missing on one id both open; the later
        // insert replaces the earlier, which closes when its user is done.)
        let file = fs.open(path, OpenHow::READ_WRITE)?;
        self.put(id, file.clone());
        Ok(file)
    }

    /// Caches `file` (just opened or created) as segment `id`'s.
    pub fn put(&self, id: u64, file: FileRef) {
        self.opens.fetch_add(1, Ordering::Relaxed);
        let evicted = {
            let mut lru = self.lock();
            lru.insert(id, file);
            let mut evicted = Vec::new();
            while lru.files.len() > self.capacity {
                match lru.pop_oldest() {
                    Some(file) => evicted.push(file),
                    None => break,
                }
            }
            evicted
        };
        // Closed (when no one else holds them) outside the lock.
        self.closes
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
        drop(evicted);
    }

    /// Segment `id` is gone (removed or replaced): its file leaves the cache.
    pub fn forget(&self, id: u64) {
        let file = self.lock().remove(id);
        if file.is_some() {
            self.closes.fetch_add(1, Ordering::Relaxed);
        }
        drop(file);
    }

    /// Files the cache holds open now.
    pub fn open_now(&self) -> u64 {
        self.lock().files.len() as u64
    }

    /// Files opened since the store opened (misses and creations).
    pub fn opens(&self) -> u64 {
        self.opens.load(Ordering::Relaxed)
    }

    /// Files that left the cache since the store opened (evicted or forgotten).
    pub fn closes(&self) -> u64 {
        self.closes.load(Ordering::Relaxed)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimFs;
    use std::path::PathBuf;

    fn setup(n: usize) -> (SimFs, Vec<PathBuf>) {
        let fs = SimFs::new(1);
        fs.create_dir_all(Path::new("/d")).unwrap();
        let paths: Vec<PathBuf> = (0..n).map(|i| PathBuf::from(format!("/d/{i}"))).collect();
        for p in &paths {
            fs.open(p, OpenHow::CREATE).unwrap();
        }
        (fs, paths)
    }

    #[test]
    fn holds_at_most_capacity_and_drops_the_least_recently_used() {
        let (fs, paths) = setup(5);
        let cache = OpenFiles::new(3);
        for (id, p) in paths.iter().enumerate().take(3) {
            cache.get(&fs, id as u64, p).unwrap();
        }
        assert_eq!((cache.open_now(), cache.opens()), (3, 3));
        // 0 is used again: 1 is now the oldest.
        cache.get(&fs, 0, &paths[0]).unwrap();
        assert_eq!(cache.opens(), 3, "a hit opens nothing");
        cache.get(&fs, 3, &paths[3]).unwrap();
        assert_eq!((cache.open_now(), cache.closes()), (3, 1));
        cache.get(&fs, 0, &paths[0]).unwrap();
        cache.get(&fs, 2, &paths[2]).unwrap();
        assert_eq!(cache.opens(), 4, "0 and 2 stayed");
        cache.get(&fs, 1, &paths[1]).unwrap();
        assert_eq!(cache.opens(), 5, "1 was the one closed");
        cache.forget(1);
        cache.forget(1);
        assert_eq!((cache.open_now(), cache.closes()), (2, 3));
    }

    #[test]
    fn a_file_in_use_outlives_its_eviction() {
        let (fs, paths) = setup(2);
        let cache = OpenFiles::new(1);
        let held = cache.get(&fs, 0, &paths[0]).unwrap();
        cache.get(&fs, 1, &paths[1]).unwrap();
        assert_eq!(cache.open_now(), 1);
        held.write_all_at(b"still open", 0).unwrap();
        let mut buf = [0u8; 10];
        cache
            .get(&fs, 0, &paths[0])
            .unwrap()
            .read_exact_at(&mut buf, 0)
            .unwrap();
        assert_eq!(&buf, b"still open");
    }
}
