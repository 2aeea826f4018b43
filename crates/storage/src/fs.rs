//! The file-system seam: every file-system operation the store performs goes through an
//! `Fs` (chosen once, at open: `StoreOptions::fs`) and the `FsFile`s it opens. `RealFs` is
//! std::fs and libc; `crate::sim::SimFs` is a simulated disk with power losses, for tests.
//!
//! Dispatch is dynamic (`Arc<dyn Fs>`, `Arc<dyn FsFile>`): one indirect call per operation,
//! next to a system call that costs a thousand times more (measured in RELIABILITY-sim.md).

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// An open file. Positional reads and writes only (the store never uses a file offset).
pub trait FsFile: Send + Sync {
    /// pread(2) until `buf` is full; `UnexpectedEof` past the end.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// pwrite(2) until all of `buf` is written.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// ftruncate(2).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The file's size (fstat(2)).
    fn size(&self) -> io::Result<u64>;
    /// fdatasync(2): the file's bytes and size are durable, not its name.
    fn sync_data(&self) -> io::Result<()>;
    /// fsync(2): as `sync_data`, and the file's other metadata; not its name.
    fn sync_all(&self) -> io::Result<()>;
}

pub type FileRef = Arc<dyn FsFile>;

/// How to open a file (always readable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenHow {
    pub write: bool,
    /// Create it when missing (its name is durable only after its directory's fsync).
    pub create: bool,
    /// Cut it to 0 bytes.
    pub truncate: bool,
}

impl OpenHow {
    pub const READ: OpenHow = OpenHow {
        write: false,
        create: false,
        truncate: false,
    };
    pub const READ_WRITE: OpenHow = OpenHow {
        write: true,
        create: false,
        truncate: false,
    };
    pub const CREATE: OpenHow = OpenHow {
        write: true,
        create: true,
        truncate: false,
    };
    pub const CREATE_TRUNCATE: OpenHow = OpenHow {
        write: true,
        create: true,
        truncate: true,
    };
}

/// A held exclusive lock on a path (released when dropped).
pub type LockGuard = Box<dyn std::any::Any + Send + Sync>;

/// The file-system operations of the store.
pub trait Fs: Send + Sync + std::fmt::Debug {
    fn open(&self, path: &Path, how: OpenHow) -> io::Result<FileRef>;
    /// The whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let file = self.open(path, OpenHow::READ)?;
        let mut buf = vec![0; crate::usize_of(file.size()?)];
        file.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }
    fn is_dir(&self, path: &Path) -> bool;
    fn exists(&self, path: &Path) -> bool;
    /// mkdir -p (new names are durable only after their parent directory's fsync).
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// The names in a directory, in no particular order.
    fn read_dir(&self, path: &Path) -> io::Result<Vec<OsString>>;
    /// rename(2), within one directory.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// rm -r.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// A directory opened for its fsync: `sync_all` on it makes the names created, renamed
    /// and removed in it durable. (Opening and syncing are apart: a failed open, say EMFILE,
    /// is retried; a failed fsync is not.)
    fn open_dir(&self, path: &Path) -> io::Result<FileRef>;
    /// Free bytes for unprivileged writers on the file system holding `path` (statvfs(3)).
    fn free_bytes(&self, path: &Path) -> io::Result<u64>;
    /// An exclusive lock on `path` (created if missing), or `WouldBlock` when another
    /// holder has it (flock(2) LOCK_EX | LOCK_NB).
    fn lock(&self, path: &Path) -> io::Result<LockGuard>;
}

/// The real file system: std::fs and libc.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

impl FsFile for File {
    #[inline]
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    #[inline]
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
    fn sync_all(&self) -> io::Result<()> {
        File::sync_all(self)
    }
}

impl Fs for RealFs {
    fn open(&self, path: &Path, how: OpenHow) -> io::Result<FileRef> {
        let file = OpenOptions::new()
            .read(true)
            .write(how.write)
            .create(how.create)
            .truncate(how.truncate)
            .open(path)?;
        Ok(Arc::new(file))
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }
    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }
    fn read_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        fs::read_dir(path)?
            .map(|item| item.map(|i| i.file_name()))
            .collect()
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }
    fn open_dir(&self, path: &Path) -> io::Result<FileRef> {
        Ok(Arc::new(File::open(path)?))
    }
    fn free_bytes(&self, path: &Path) -> io::Result<u64> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c_path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: c_path is a valid NUL-terminated string and stat a valid out-pointer.
        let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
    }
    fn lock(&self, path: &Path) -> io::Result<LockGuard> {
        use std::os::fd::AsRawFd;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        Ok(Box::new(file))
    }
}

/// What the store's file operations go through: the file system, the test faults and the
/// cache of open segment files.
#[derive(Clone)]
pub(crate) struct Io {
    pub fs: Arc<dyn Fs>,
    pub faults: Arc<crate::faults::Faults>,
    /// The segment files held open (bounded).
    pub files: Arc<crate::open_files::OpenFiles>,
}
