//! Segment files: `segments/<id as 16 hex digits>.seg`, raw 4 KiB blocks appended in write
//! order, preallocated to the full segment size when created. A segment holds no header:
//! what each block is (volume, address, crc) lives in the block map, so the files need no
//! parsing and a torn segment is impossible to misread (every read is crc-verified).

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

#[derive(Debug)]
pub struct Segment {
    pub id: u64,
    pub path: PathBuf,
    pub file: Arc<File>,
    /// Appends whose data is written but not yet committed to (or abandoned by) the map.
    pub pending: AtomicU32,
    /// No more appends: the active segment moved on.
    pub sealed: AtomicBool,
    /// Deleted from disk; reads through an already-open handle still work.
    pub removed: AtomicBool,
}

pub fn file_name(id: u64) -> String {
    format!("{id:016x}.seg")
}

pub fn parse_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Opens with O_DIRECT where the filesystem supports it (tmpfs on older kernels does not),
/// else buffered. Returns whether O_DIRECT is in effect.
fn open(path: &Path, create: bool, direct: bool) -> std::io::Result<(File, bool)> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if create {
        o.create_new(true);
    }
    if direct {
        match o.clone().custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok((o.open(path)?, false))
}

impl Segment {
    pub fn create(dir: &Path, id: u64, direct: bool) -> Result<(Segment, bool)> {
        let path = dir.join(file_name(id));
        let (file, direct) =
            open(&path, true, direct).map_err(|e| Error::io(path.display().to_string(), e))?;
        Ok((Segment::new(id, path, file), direct))
    }

    /// Preallocates `[from, to)` so appends there do not extend the file (extending
    /// O_DIRECT writes serialise on the inode lock in ext4/xfs). Where the filesystem
    /// cannot preallocate, appends extend the file instead.
    pub fn preallocate(&self, from: u64, to: u64) -> Result<()> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&*self.file);
        // SAFETY: plain syscall on a valid fd.
        let r = unsafe { libc::fallocate(fd, 0, from as i64, (to - from) as i64) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) => Ok(()),
                _ => Err(Error::io(format!("preallocate {}", self.path.display()), e)),
            };
        }
        Ok(())
    }

    pub fn open_existing(path: PathBuf, id: u64, direct: bool) -> Result<Segment> {
        let (file, _) =
            open(&path, false, direct).map_err(|e| Error::io(path.display().to_string(), e))?;
        let s = Segment::new(id, path, file);
        s.sealed.store(true, Ordering::Release);
        Ok(s)
    }

    fn new(id: u64, path: PathBuf, file: File) -> Segment {
        Segment {
            id,
            path,
            file: Arc::new(file),
            pending: AtomicU32::new(0),
            sealed: AtomicBool::new(false),
            removed: AtomicBool::new(false),
        }
    }

    /// Bytes the file really occupies on disk.
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    /// End of the last data region (preallocated but never written space reads as a hole).
    pub fn data_end(&self) -> u64 {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&*self.file);
        let mut end = 0i64;
        let mut pos = 0i64;
        loop {
            // SAFETY: plain syscalls on a valid fd.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                break;
            }
            end = hole;
            pos = hole;
        }
        end as u64
    }
}
