//! The audit log: admin operations, key and grant changes, failed authentications and
//! denied requests (who, what, which resource, from where), as events of the target
//! `tidewater::audit`. They always reach the server's log; with `[auth] audit_file` they are
//! also written there as JSON lines, bounded: past `audit_max_bytes` the file is renamed to
//! `<file>.1` (replacing the one before) and a new one begun, so the two together never hold
//! more than twice the bound.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The events' target.
pub const TARGET: &str = "tidewater::audit";

/// A file that starts over (keeping one previous) past `max_bytes`.
#[derive(Clone)]
pub struct AuditFile(Arc<Mutex<Rotating>>);

struct Rotating {
    path: PathBuf,
    max_bytes: u64,
    file: File,
    written: u64,
}

fn open(path: &Path) -> std::io::Result<(File, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    // Who did what, from where: readable by the server's user only.
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let written = file.metadata()?.len();
    Ok((file, written))
}

impl AuditFile {
    pub fn open(path: &Path, max_bytes: u64) -> std::io::Result<AuditFile> {
        let (file, written) = open(path)?;
        Ok(AuditFile(Arc::new(Mutex::new(Rotating {
            path: path.to_path_buf(),
            max_bytes: max_bytes.max(4096),
            file,
            written,
        }))))
    }
}

impl Rotating {
    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.written > 0 && self.written + line.len() as u64 > self.max_bytes {
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            std::fs::rename(&self.path, &old)?;
            let (file, written) = open(&self.path)?;
            self.file = file;
            self.written = written;
        }
        self.file.write_all(line)?;
        self.written += line.len() as u64;
        Ok(())
    }
}

/// One event's bytes, written whole when dropped (the formatter writes an event in pieces).
pub struct Line {
    target: AuditFile,
    buf: Vec<u8>,
}

impl Write for Line {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let mut rotating = self.target.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(err) = rotating.write_line(&self.buf) {
            // Nowhere else to say it without looping through the audit target.
            let _ = writeln!(std::io::stderr(), "tidewater: the audit file failed: {err}");
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for AuditFile {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            target: self.clone(),
            buf: Vec::with_capacity(256),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::MakeWriter;

    #[test]
    fn the_file_starts_over_past_its_bound_keeping_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let file = AuditFile::open(&path, 4096).unwrap();
        for i in 0..200 {
            let mut line = file.make_writer();
            writeln!(line, "{{\"event\":{i},\"pad\":\"{}\"}}", "x".repeat(40)).unwrap();
        }
        let now = std::fs::read_to_string(&path).unwrap();
        let before = std::fs::read_to_string(dir.path().join("audit.log.1")).unwrap();
        assert!(now.len() <= 4096 && before.len() <= 4096);
        assert!(
            now.lines().chain(before.lines()).all(|l| l.ends_with('}')),
            "lines are whole"
        );
        assert!(
            now.ends_with("\"event\":199,\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}\n")
        );
    }
}
