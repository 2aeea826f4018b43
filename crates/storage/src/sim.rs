//! A simulated disk for power-loss tests: an in-memory file system (`SimFs`, an `Fs`) that
//! keeps what was written apart from what was made durable, and at a simulated power loss
//! keeps any outcome POSIX allows. Seeded and deterministic: the same seed and the same
//! sequence of operations give the same disk after every power loss.
//!
//! What is durable:
//! - a file's bytes and size, as of its last `sync_data`/`sync_all` (fdatasync/fsync);
//! - a directory's names (created, renamed, removed), as of its last fsync (`open_dir` +
//!   `sync_all`). A new file's or directory's name is an entry of its parent: an fsync of the
//!   file itself does not make its name durable.
//!
//! At a power loss (`power_loss`), for everything not durable:
//! - each file whose bytes or size changed since its last sync comes back with its size
//!   either as synced, as written, or (growing) at a sector boundary between; each sector
//!   that differs is the synced one or the written one: all kept, all lost, a prefix kept,
//!   or each sector by a coin (the sector is 512 B or 4 KiB, chosen by the seed); bytes
//!   never synced and not kept read as zeros;
//! - each name created, removed or renamed in a directory since its last fsync is kept or
//!   reverted; a rename is one decision for both its names (atomic), every other name is
//!   decided alone. A directory whose name is reverted takes its whole subtree with it.
//!
//! Not simulated: bit rot, lying or failing fsyncs (a sync is durable when it returns),
//! misdirected or reordered sectors of a sync, read errors, a full disk, metadata other
//! than names and sizes. Crash points are operation counts: `cut_after(n)` lets `n` more
//! mutating operations (create, write, truncate, sync, rename, remove, mkdir) through and
//! fails every operation after them with EIO until `power_loss`; reads do not count.
//! Handles opened before a power loss fail forever after it (the process died with them).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::fs::{FileRef, Fs, FsFile, LockGuard, OpenHow};

/// splitmix64: small, seedable, good enough to pick outcomes.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

#[derive(Debug, Default)]
struct FileNode {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Bytes changed since the last sync (positions in `data`).
    dirty: Option<(usize, usize)>,
}

impl FileNode {
    fn mark(&mut self, lo: usize, hi: usize) {
        self.dirty = Some(match self.dirty {
            Some((a, b)) => (a.min(lo), b.max(hi)),
            None => (lo, hi),
        });
    }
    fn sync(&mut self) {
        let len = self.data.len();
        self.durable.resize(len, 0);
        if let Some((lo, hi)) = self.dirty.take() {
            let hi = hi.min(len);
            if lo < hi {
                self.durable[lo..hi].copy_from_slice(&self.data[lo..hi]);
            }
        }
    }
}

#[derive(Debug, Default)]
struct DirNode {
    entries: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, u64>,
    /// Renames (from, to) since the last fsync: each is kept or reverted as a whole.
    renames: Vec<(OsString, OsString)>,
}

#[derive(Debug)]
enum Node {
    File(FileNode),
    Dir(DirNode),
}

#[derive(Debug)]
struct Disk {
    nodes: BTreeMap<u64, Node>,
    next_ino: u64,
    /// Bumped at each power loss: handles of an earlier generation are dead.
    generation: u64,
    /// Mutating operations so far (all generations).
    ops: u64,
    /// Fail every operation once `ops` reaches this.
    cut_at: Option<u64>,
    cut: bool,
    locks: BTreeSet<PathBuf>,
    rng: SimRng,
    sector: usize,
    power_losses: u64,
    /// The last operations, for failure reports.
    trace: VecDeque<String>,
    /// Open file and directory handles now, the most at once, and the limit (EMFILE past it).
    handles: u64,
    most_handles: u64,
    handle_limit: Option<u64>,
}

const ROOT: u64 = 1;
const TRACE_LEN: usize = 48;

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("simulated disk: {what}"))
}

impl Disk {
    fn dir(&self, ino: u64) -> io::Result<&DirNode> {
        match self.nodes.get(&ino) {
            Some(Node::Dir(d)) => Ok(d),
            Some(Node::File(_)) => Err(io::Error::from(io::ErrorKind::NotADirectory)),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }
    fn dir_mut(&mut self, ino: u64) -> io::Result<&mut DirNode> {
        match self.nodes.get_mut(&ino) {
            Some(Node::Dir(d)) => Ok(d),
            Some(Node::File(_)) => Err(io::Error::from(io::ErrorKind::NotADirectory)),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }
    fn file_mut(&mut self, ino: u64) -> io::Result<&mut FileNode> {
        match self.nodes.get_mut(&ino) {
            Some(Node::File(f)) => Ok(f),
            Some(Node::Dir(_)) => Err(io::Error::from(io::ErrorKind::IsADirectory)),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    fn components(path: &Path) -> io::Result<Vec<&OsStr>> {
        let mut out = Vec::new();
        for c in path.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(name) => out.push(name),
                _ => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
            }
        }
        Ok(out)
    }

    fn lookup(&self, path: &Path) -> io::Result<u64> {
        let mut ino = ROOT;
        for name in Disk::components(path)? {
            ino = *self
                .dir(ino)?
                .entries
                .get(name)
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        }
        Ok(ino)
    }

    /// The directory holding `path`'s last component, and that component.
    fn parent(&self, path: &Path) -> io::Result<(u64, OsString)> {
        let parts = Disk::components(path)?;
        let (name, dirs) = parts
            .split_last()
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut ino = ROOT;
        for d in dirs {
            ino = *self
                .dir(ino)?
                .entries
                .get(*d)
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        }
        self.dir(ino)?;
        Ok((ino, name.to_os_string()))
    }

    fn new_node(&mut self, node: Node) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, node);
        ino
    }

    /// Counts a mutating operation; fails it (and cuts the power) at the cut point.
    fn step(&mut self, what: impl FnOnce() -> String) -> io::Result<()> {
        if self.cut {
            return Err(eio("the power is cut"));
        }
        if self.cut_at.is_some_and(|at| self.ops >= at) {
            self.cut = true;
            self.note(format!(
                "-- power cut before op {} ({})",
                self.ops + 1,
                what()
            ));
            return Err(eio("the power is cut"));
        }
        self.ops += 1;
        let line = format!("{:>6} {}", self.ops, what());
        self.note(line);
        Ok(())
    }

    fn note(&mut self, line: String) {
        if self.trace.len() == TRACE_LEN {
            self.trace.pop_front();
        }
        self.trace.push_back(line);
    }

    fn alive(&self, generation: u64) -> io::Result<()> {
        if self.cut {
            Err(eio("the power is cut"))
        } else if generation != self.generation {
            Err(eio("handle from before a power loss"))
        } else {
            Ok(())
        }
    }

    fn power_loss(&mut self) -> String {
        self.power_losses += 1;
        // Every process dies with the power: no lock survives (a guard dropped later, of a
        // store that outlived the cut, must not free a lock taken since: generations).
        self.locks.clear();
        let sector = self.sector;
        let mut rng = self.rng.clone();
        // How much of what was not synced survives, this time: nothing, everything, or
        // each piece by a coin of a bias drawn now.
        let bias = match rng.below(4) {
            0 => 0.0,
            1 => 1.0,
            _ => (rng.below(1001) as f64) / 1000.0,
        };
        let mut report = format!("power loss #{} (bias {bias:.3}):", self.power_losses);
        for (ino, node) in self.nodes.iter_mut() {
            match node {
                Node::File(f) => {
                    if f.dirty.is_none() && f.data.len() == f.durable.len() {
                        continue;
                    }
                    let (old, new) = (&f.durable, &f.data);
                    let len = if old.len() == new.len() {
                        new.len()
                    } else if new.len() > old.len() && rng.chance(0.3) {
                        // Grown, and cut at a sector boundary in between.
                        let lo = old.len().div_ceil(sector);
                        let hi = new.len().div_ceil(sector);
                        let at = lo + crate::usize_of(rng.below((hi - lo + 1) as u64));
                        (at * sector).clamp(old.len(), new.len())
                    } else if rng.chance(bias) {
                        new.len()
                    } else {
                        old.len()
                    };
                    let n_sectors = len.div_ceil(sector);
                    let by_prefix = rng.chance(0.25);
                    let prefix = crate::usize_of(rng.below(n_sectors as u64 + 1));
                    let mut out = vec![0u8; len];
                    let mut kept = 0;
                    let mut lost = 0;
                    for i in 0..n_sectors {
                        let range = i * sector..((i + 1) * sector).min(len);
                        let pick = |v: &Vec<u8>, out: &mut [u8]| {
                            let end = range.end.min(v.len());
                            if range.start < end {
                                out[range.start..end].copy_from_slice(&v[range.start..end]);
                            }
                        };
                        let same = {
                            let a = old.get(range.clone());
                            let b = new.get(range.clone());
                            a.is_some() && a == b
                        };
                        let keep_new = same
                            || if by_prefix {
                                i < prefix
                            } else {
                                rng.chance(bias)
                            };
                        if keep_new {
                            pick(new, &mut out);
                            kept += !same as usize;
                        } else {
                            pick(old, &mut out);
                            lost += 1;
                        }
                    }
                    report.push_str(&format!(
                        " ino {ino}: {}->{} of {} bytes, {kept} sectors kept, {lost} old;",
                        old.len(),
                        len,
                        new.len()
                    ));
                    f.data = out.clone();
                    f.durable = out;
                    f.dirty = None;
                }
                Node::Dir(d) => {
                    if d.entries == d.durable {
                        d.renames.clear();
                        continue;
                    }
                    // Names that differ, grouped by the renames that tie them.
                    let mut group: BTreeMap<OsString, usize> = BTreeMap::new();
                    let mut n_groups = 0;
                    for (from, to) in &d.renames {
                        let g = match (group.get(from), group.get(to)) {
                            (Some(&g), _) | (None, Some(&g)) => g,
                            (None, None) => {
                                n_groups += 1;
                                n_groups - 1
                            }
                        };
                        // Merge: relabel anything in the other group.
                        let others: Vec<usize> = [group.get(from), group.get(to)]
                            .into_iter()
                            .flatten()
                            .copied()
                            .filter(|&o| o != g)
                            .collect();
                        for v in group.values_mut() {
                            if others.contains(v) {
                                *v = g;
                            }
                        }
                        group.insert(from.clone(), g);
                        group.insert(to.clone(), g);
                    }
                    let names: BTreeSet<OsString> =
                        d.entries.keys().chain(d.durable.keys()).cloned().collect();
                    let mut decided: BTreeMap<usize, bool> = BTreeMap::new();
                    let mut result = BTreeMap::new();
                    for name in names {
                        let now = d.entries.get(&name).copied();
                        let before = d.durable.get(&name).copied();
                        let keep = if now == before {
                            true
                        } else if let Some(&g) = group.get(&name) {
                            *decided.entry(g).or_insert_with(|| rng.chance(bias))
                        } else {
                            rng.chance(bias)
                        };
                        let pick = if keep { now } else { before };
                        if now != before {
                            report.push_str(&format!(
                                " dir {ino} {:?}: {}",
                                name,
                                if keep { "kept" } else { "reverted" }
                            ));
                        }
                        if let Some(child) = pick {
                            result.insert(name, child);
                        }
                    }
                    d.entries = result.clone();
                    d.durable = result;
                    d.renames.clear();
                }
            }
        }
        self.rng = rng;
        self.generation += 1;
        self.cut = false;
        self.cut_at = None;
        self.locks.clear();
        report
    }
}

/// The simulated disk (cheap to clone: clones share the disk).
#[derive(Clone)]
pub struct SimFs {
    disk: Arc<Mutex<Disk>>,
}

impl std::fmt::Debug for SimFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let disk = self.lock();
        write!(
            f,
            "SimFs {{ ops: {}, generation: {}, cut: {} }}",
            disk.ops, disk.generation, disk.cut
        )
    }
}

impl SimFs {
    /// An empty disk whose outcomes at power losses come from `seed`.
    pub fn new(seed: u64) -> SimFs {
        let mut rng = SimRng::new(seed);
        let sector = if rng.chance(0.5) { 512 } else { 4096 };
        let mut nodes = BTreeMap::new();
        nodes.insert(ROOT, Node::Dir(DirNode::default()));
        SimFs {
            disk: Arc::new(Mutex::new(Disk {
                nodes,
                next_ino: ROOT + 1,
                generation: 0,
                ops: 0,
                cut_at: None,
                cut: false,
                locks: BTreeSet::new(),
                rng,
                sector,
                power_losses: 0,
                trace: VecDeque::new(),
                handles: 0,
                most_handles: 0,
                handle_limit: None,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates `path` and its parents, durably (as an operator's mkdir + sync would):
    /// the data directory a test opens a store in.
    pub fn create_dir_durable(&self, path: &Path) -> io::Result<()> {
        self.create_dir_all(path)?;
        let mut disk = self.lock();
        for node in disk.nodes.values_mut() {
            if let Node::Dir(d) = node {
                d.durable = d.entries.clone();
                d.renames.clear();
            }
        }
        Ok(())
    }

    /// Mutating operations so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Lets `n` more mutating operations through, then cuts the power: every later
    /// operation fails with EIO until `power_loss`.
    pub fn cut_after(&self, n: u64) {
        let mut disk = self.lock();
        disk.cut_at = Some(disk.ops + n);
    }

    /// Forgets a cut point not reached yet.
    pub fn disarm(&self) {
        self.lock().cut_at = None;
    }

    /// Whether the power is cut (a cut point was reached).
    pub fn is_cut(&self) -> bool {
        self.lock().cut
    }

    /// Cuts the power now.
    pub fn cut_now(&self) {
        let mut disk = self.lock();
        disk.cut = true;
        disk.note("-- power cut".into());
    }

    /// The power comes back: what was not durable is kept, lost or torn as the seed
    /// decides; handles opened before are dead. Returns a description of the outcome.
    pub fn power_loss(&self) -> String {
        let mut disk = self.lock();
        let report = disk.power_loss();
        disk.note(format!("-- {report}"));
        report
    }

    /// The sector size of this disk (512 or 4096, from the seed).
    pub fn sector_size(&self) -> usize {
        self.lock().sector
    }

    /// The last operations and power losses, oldest first.
    pub fn trace(&self) -> Vec<String> {
        self.lock().trace.iter().cloned().collect()
    }

    /// Refuses opens past `limit` handles open at once with EMFILE, as a process's
    /// open-files limit does (`None`: no limit).
    pub fn set_handle_limit(&self, limit: Option<u64>) {
        self.lock().handle_limit = limit;
    }

    /// File and directory handles open now, and the most that were open at once.
    pub fn handles(&self) -> (u64, u64) {
        let disk = self.lock();
        (disk.handles, disk.most_handles)
    }
}

impl Disk {
    /// Counts a new handle, or refuses it past the limit.
    fn take_handle(&mut self) -> io::Result<()> {
        if self.handle_limit.is_some_and(|limit| self.handles >= limit) {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        self.handles += 1;
        self.most_handles = self.most_handles.max(self.handles);
        Ok(())
    }
}

impl Drop for SimFile {
    fn drop(&mut self) {
        self.lock().handles -= 1;
    }
}

struct SimFile {
    disk: Arc<Mutex<Disk>>,
    ino: u64,
    generation: u64,
    writable: bool,
    path: PathBuf,
}

impl SimFile {
    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl FsFile for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut disk = self.lock();
        disk.alive(self.generation)?;
        let file = disk.file_mut(self.ino)?;
        let start = crate::usize_of(offset);
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        if end > file.data.len() {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        buf.copy_from_slice(&file.data[start..end]);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let mut disk = self.lock();
        disk.alive(self.generation)?;
        disk.step(|| {
            format!(
                "pwrite {} [{}..{})",
                self.path.display(),
                offset,
                offset + buf.len() as u64
            )
        })?;
        let file = disk.file_mut(self.ino)?;
        let start = crate::usize_of(offset);
        let end = start + buf.len();
        let old_len = file.data.len();
        if file.data.len() < end {
            file.data.resize(end, 0);
        }
        file.data[start..end].copy_from_slice(buf);
        file.mark(start.min(old_len), end);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        let mut disk = self.lock();
        disk.alive(self.generation)?;
        disk.step(|| format!("ftruncate {} {len}", self.path.display()))?;
        let file = disk.file_mut(self.ino)?;
        let len = crate::usize_of(len);
        let old = file.data.len();
        file.data.resize(len, 0);
        file.mark(old.min(len), old.max(len));
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        let mut disk = self.lock();
        disk.alive(self.generation)?;
        Ok(disk.file_mut(self.ino)?.data.len() as u64)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.sync_all()
    }

    fn sync_all(&self) -> io::Result<()> {
        let mut disk = self.lock();
        disk.alive(self.generation)?;
        disk.step(|| format!("fsync {}", self.path.display()))?;
        match disk.nodes.get_mut(&self.ino) {
            Some(Node::File(f)) => f.sync(),
            Some(Node::Dir(d)) => {
                d.durable = d.entries.clone();
                d.renames.clear();
            }
            None => return Err(io::Error::from(io::ErrorKind::NotFound)),
        }
        Ok(())
    }
}

impl Fs for SimFs {
    fn open(&self, path: &Path, how: OpenHow) -> io::Result<FileRef> {
        let mut disk = self.lock();
        let generation = disk.generation;
        disk.alive(generation)?;
        // The handle is counted first: past the limit, the open fails with nothing changed.
        disk.take_handle()?;
        let opened = (|| match disk.lookup(path) {
            Ok(ino) => {
                if how.truncate {
                    disk.step(|| format!("open+truncate {}", path.display()))?;
                    let file = disk.file_mut(ino)?;
                    let old = file.data.len();
                    file.data.clear();
                    file.mark(0, old);
                } else {
                    disk.file_mut(ino)?;
                }
                Ok(ino)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && how.create => {
                let (dir, name) = disk.parent(path)?;
                disk.step(|| format!("create {}", path.display()))?;
                let ino = disk.new_node(Node::File(FileNode::default()));
                disk.dir_mut(dir)?.entries.insert(name, ino);
                Ok(ino)
            }
            Err(e) => Err(e),
        })();
        let ino = match opened {
            Ok(ino) => ino,
            Err(e) => {
                disk.handles -= 1;
                return Err(e);
            }
        };
        Ok(Arc::new(SimFile {
            disk: self.disk.clone(),
            ino,
            generation,
            writable: how.write,
            path: path.to_path_buf(),
        }))
    }

    fn is_dir(&self, path: &Path) -> bool {
        let disk = self.lock();
        !disk.cut && matches!(disk.lookup(path).map(|i| disk.dir(i).is_ok()), Ok(true))
    }

    fn exists(&self, path: &Path) -> bool {
        let disk = self.lock();
        !disk.cut && disk.lookup(path).is_ok()
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut disk = self.lock();
        let generation = disk.generation;
        disk.alive(generation)?;
        let mut ino = ROOT;
        let mut at = PathBuf::from("/");
        for name in Disk::components(path)? {
            at.push(name);
            ino = match disk.dir(ino)?.entries.get(name) {
                Some(&child) => {
                    disk.dir(child)?;
                    child
                }
                None => {
                    disk.step(|| format!("mkdir {}", at.display()))?;
                    let child = disk.new_node(Node::Dir(DirNode::default()));
                    disk.dir_mut(ino)?
                        .entries
                        .insert(name.to_os_string(), child);
                    child
                }
            };
        }
        Ok(())
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        let disk = self.lock();
        let generation = disk.generation;
        disk.alive(generation)?;
        let ino = disk.lookup(path)?;
        Ok(disk.dir(ino)?.entries.keys().cloned().collect())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut disk = self.lock();
        let generation = disk.generation;
        disk.alive(generation)?;
        let (dir, from_name) = disk.parent(from)?;
        let (to_dir, to_name) = disk.parent(to)?;
        if dir != to_dir {
            return Err(io::Error::other(
                "simulated disk: rename across directories is not simulated",
            ));
        }
        if !disk.dir(dir)?.entries.contains_key(&from_name) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        disk.step(|| format!("rename {} -> {}", from.display(), to.display()))?;
        let d = disk.dir_mut(dir)?;
        let ino = d.entries.remove(&from_name).expect("checked");
        d.entries.insert(to_name.clone(), ino);
        d.renames.push((from_name, to_name));
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut disk = self.lock();
        let generation = disk.generation;
        disk.alive(generation)?;
        let (dir, name) = disk.parent(path)?;
        let ino = *disk
            .dir(dir)?
            .entries
            .get(&name)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        disk.file_mut(ino)?;
        disk.step(|| format!("unlink {}", path.display()))?;
        disk.dir_mut(dir)?.entries.remove(&name);
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        // As rm -r does it: the children first (each an unlink), then the directory.
        let names = self.read_dir(path)?;
        for name in names {
            let child = path.join(&name);
            if self.is_dir(&child) {
                self.remove_dir_all(&child)?;
            } else {
                self.remove_file(&child)?;
            }
        }
        let mut disk = self.lock();
        let generation = disk.generation;
        disk.alive(generation)?;
        let (dir, name) = disk.parent(path)?;
        disk.step(|| format!("rmdir {}", path.display()))?;
        disk.dir_mut(dir)?.entries.remove(&name);
        Ok(())
    }

    fn open_dir(&self, path: &Path) -> io::Result<FileRef> {
        let mut disk = self.lock();
        let generation = disk.generation;
        disk.alive(generation)?;
        let ino = disk.lookup(path)?;
        disk.dir(ino)?;
        disk.take_handle()?;
        Ok(Arc::new(SimFile {
            disk: self.disk.clone(),
            ino,
            generation,
            writable: false,
            path: path.to_path_buf(),
        }))
    }

    fn free_bytes(&self, _path: &Path) -> io::Result<u64> {
        Ok(1 << 40)
    }

    fn lock(&self, path: &Path) -> io::Result<LockGuard> {
        let mut disk = SimFs::lock(self);
        if !disk.locks.insert(path.to_path_buf()) {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        Ok(Box::new(SimLock {
            disk: self.disk.clone(),
            path: path.to_path_buf(),
            generation: disk.generation,
        }))
    }
}

struct SimLock {
    disk: Arc<Mutex<Disk>>,
    path: PathBuf,
    generation: u64,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        if disk.generation == self.generation {
            disk.locks.remove(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(fs: &SimFs, path: &str, bytes: &[u8], sync: bool) -> FileRef {
        let file = fs.open(Path::new(path), OpenHow::CREATE).unwrap();
        let len = file.size().unwrap();
        file.write_all_at(bytes, len).unwrap();
        if sync {
            file.sync_data().unwrap();
        }
        file
    }

    #[test]
    fn synced_data_and_names_survive_every_power_loss() {
        for seed in 0..200 {
            let fs = SimFs::new(seed);
            fs.create_dir_durable(Path::new("/d")).unwrap();
            write(&fs, "/d/a", &[7; 10_000], true);
            fs.open_dir(Path::new("/d")).unwrap().sync_all().unwrap();
            write(&fs, "/d/a", &[8; 5_000], false);
            write(&fs, "/d/b", &[9; 100], true); // synced, but its name is not
            fs.power_loss();
            let a = fs.read(Path::new("/d/a")).unwrap();
            assert!(a.len() >= 10_000 && a.len() <= 15_000, "seed {seed}");
            assert!(a[..10_000].iter().all(|&b| b == 7), "seed {seed}");
            assert!(a[10_000..].iter().all(|&b| b == 8 || b == 0), "seed {seed}");
            if let Ok(b) = fs.read(Path::new("/d/b")) {
                assert_eq!(b, vec![9; 100]);
            }
        }
    }

    #[test]
    fn unsynced_outcomes_cover_lost_kept_and_torn() {
        let (mut lost, mut kept, mut torn, mut name_lost, mut name_kept) = (0, 0, 0, 0, 0);
        for seed in 0..300 {
            let fs = SimFs::new(seed);
            fs.create_dir_durable(Path::new("/d")).unwrap();
            let file = write(&fs, "/d/a", &[1; 16_384], true);
            fs.open_dir(Path::new("/d")).unwrap().sync_all().unwrap();
            file.write_all_at(&[2; 16_384], 0).unwrap();
            write(&fs, "/d/new", b"x", true);
            fs.power_loss();
            let a = fs.read(Path::new("/d/a")).unwrap();
            match (a.contains(&1), a.contains(&2)) {
                (true, false) => lost += 1,
                (false, true) => kept += 1,
                _ => torn += 1,
            }
            if fs.exists(Path::new("/d/new")) {
                name_kept += 1
            } else {
                name_lost += 1
            }
            // Handles from before the power loss are dead.
            assert!(file.write_all_at(b"z", 0).is_err());
        }
        assert!(lost > 10 && kept > 10 && torn > 10, "{lost} {kept} {torn}");
        assert!(name_lost > 10 && name_kept > 10);
    }

    #[test]
    fn a_rename_is_kept_or_reverted_whole() {
        for seed in 0..200 {
            let fs = SimFs::new(seed);
            fs.create_dir_durable(Path::new("/d")).unwrap();
            write(&fs, "/d/tmp", b"new", true);
            fs.open_dir(Path::new("/d")).unwrap().sync_all().unwrap();
            fs.rename(Path::new("/d/tmp"), Path::new("/d/final"))
                .unwrap();
            fs.power_loss();
            let tmp = fs.exists(Path::new("/d/tmp"));
            let fin = fs.exists(Path::new("/d/final"));
            assert!(tmp != fin, "seed {seed}: tmp {tmp} final {fin}");
        }
    }

    #[test]
    fn the_cut_point_fails_later_operations_and_is_reproducible() {
        let run = |seed| {
            let fs = SimFs::new(seed);
            fs.create_dir_durable(Path::new("/d")).unwrap();
            fs.cut_after(3);
            let file = fs.open(Path::new("/d/a"), OpenHow::CREATE).unwrap(); // 1
            file.write_all_at(b"abc", 0).unwrap(); // 2
            file.sync_data().unwrap(); // 3
            assert!(file.write_all_at(b"def", 3).is_err());
            assert!(fs.is_cut());
            assert!(fs.read(Path::new("/d/a")).is_err());
            fs.power_loss();
            fs.read(Path::new("/d/a")).ok()
        };
        for seed in 0..50 {
            assert_eq!(run(seed), run(seed));
            if let Some(bytes) = run(seed) {
                assert_eq!(bytes, b"abc");
            }
        }
    }
}
