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
    /// The append stream (one per volume) this segment belongs to.
    pub stream: u64,
    pub path: PathBuf,
    pub file: Arc<File>,
    /// Appends whose data is written but not yet committed to (or abandoned by) the map.
    pub pending: AtomicU32,
    /// No more appends: the active segment moved on.
    pub sealed: AtomicBool,
    /// Deleted from disk; reads through an already-open handle still work.
    pub removed: AtomicBool,
    /// Blocks reserved so far (final once sealed): what an upload covers.
    pub used_blocks: AtomicU32,
    /// For segments whose data is in the object store: which 64 KiB frames are in the
    /// file (`None`: all of it is, the file is authoritative).
    pub resident: parking_lot::Mutex<Option<Vec<u64>>>,
    /// Last read (unix ms), for cache eviction.
    pub last_access: std::sync::atomic::AtomicU64,
    /// Reads between their residency check (or fetch) and the end of their file read:
    /// eviction leaves the segment alone while any is in flight, or it could punch out
    /// frames such a read found resident (the read would then see zeros).
    pub readers: AtomicU32,
    /// The fill record changed since the last sync: fdatasync does not have to persist an
    /// extended attribute, so the next sync of this file is a full fsync.
    pub fill_dirty: AtomicBool,
}

/// Extended attribute holding a recycled file's fill record (u32 LE, blocks).
const FILL_XATTR: &std::ffi::CStr = c"user.sprites.fill";

/// Blocks per residency frame (64 KiB), as in the chunk object format.
pub const FRAME_BLOCKS: u32 = 16;

pub fn frames_words(blocks: u32) -> usize {
    (blocks.div_ceil(FRAME_BLOCKS) as usize).div_ceil(64)
}

/// A residency bitmap with every frame of `blocks` blocks present.
pub fn all_frames(blocks: u32) -> Vec<u64> {
    let frames = blocks.div_ceil(FRAME_BLOCKS) as usize;
    let mut bits = vec![0u64; frames.div_ceil(64)];
    for f in 0..frames {
        bits[f / 64] |= 1 << (f % 64);
    }
    bits
}

pub fn file_name(id: u64, stream: u64) -> String {
    format!("{id:016x}-{stream:016x}.seg")
}

/// `(segment id, stream)` from a segment file name.
pub fn parse_file_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".seg")?;
    let (id, stream) = stem.split_once('-')?;
    if id.len() != 16 || stream.len() != 16 {
        return None;
    }
    Some((
        u64::from_str_radix(id, 16).ok()?,
        u64::from_str_radix(stream, 16).ok()?,
    ))
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
    pub fn create(dir: &Path, id: u64, stream: u64, direct: bool) -> Result<(Segment, bool)> {
        let path = dir.join(file_name(id, stream));
        let (file, direct) =
            open(&path, true, direct).map_err(|e| Error::io(path.display().to_string(), e))?;
        Ok((Segment::new(id, stream, path, file), direct))
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

    pub fn open_existing(path: PathBuf, id: u64, stream: u64, direct: bool) -> Result<Segment> {
        let (file, _) =
            open(&path, false, direct).map_err(|e| Error::io(path.display().to_string(), e))?;
        let s = Segment::new(id, stream, path, file);
        s.sealed.store(true, Ordering::Release);
        let used = s.written_end().div_ceil(crate::crc::BLOCK_SIZE as u64) as u32;
        s.used_blocks.store(used, Ordering::Release);
        Ok(s)
    }

    /// Opens a recycled file (already renamed to this segment's name) for appends: every
    /// block of it is written, so its extents need no conversion when appends overwrite
    /// them. Its fill record (0 when it entered the free pool) bounds what recovery
    /// takes for data.
    pub fn open_recycled(
        path: PathBuf,
        id: u64,
        stream: u64,
        direct: bool,
    ) -> Result<(Segment, bool)> {
        let (file, direct) =
            open(&path, false, direct).map_err(|e| Error::io(path.display().to_string(), e))?;
        Ok((Segment::new(id, stream, path, file), direct))
    }

    /// Records durably (with the file's next sync; at once against a process crash)
    /// that no block at or past `blocks` holds data of this segment. Recycled files are
    /// written end to end with an earlier segment's blocks, so their holes no longer tell
    /// where the data ends; this record does.
    pub fn set_fill(&self, blocks: u32) -> std::io::Result<()> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&*self.file);
        let v = blocks.to_le_bytes();
        // SAFETY: plain syscall on a valid fd; name and value outlive the call.
        let r = unsafe { libc::fsetxattr(fd, FILL_XATTR.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.fill_dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// The fill record, if the file has one (only recycled files do).
    pub fn fill(&self) -> Option<u32> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&*self.file);
        let mut v = [0u8; 4];
        // SAFETY: plain syscall on a valid fd; the buffer is 4 bytes as passed.
        let r = unsafe { libc::fgetxattr(fd, FILL_XATTR.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        (r == 4).then(|| u32::from_le_bytes(v))
    }

    /// Where the segment's data ends: the end of its last data region, clipped at the
    /// fill record when there is one.
    pub fn written_end(&self) -> u64 {
        let end = self.data_end();
        match self.fill() {
            Some(f) => end.min(f as u64 * crate::crc::BLOCK_SIZE as u64),
            None => end,
        }
    }

    fn new(id: u64, stream: u64, path: PathBuf, file: File) -> Segment {
        Segment {
            id,
            stream,
            path,
            file: Arc::new(file),
            pending: AtomicU32::new(0),
            sealed: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            used_blocks: AtomicU32::new(0),
            resident: parking_lot::Mutex::new(None),
            last_access: std::sync::atomic::AtomicU64::new(0),
            readers: AtomicU32::new(0),
            fill_dirty: AtomicBool::new(false),
        }
    }

    /// A sparse file standing for a segment whose data is only in the object store (a
    /// volume opened on a host that never had it). Frames are fetched into it on reads.
    pub fn create_remote(
        dir: &Path,
        id: u64,
        stream: u64,
        blocks: u32,
        direct: bool,
    ) -> Result<Segment> {
        let path = dir.join(file_name(id, stream));
        let (file, _) = match open(&path, true, direct) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                open(&path, false, direct).map_err(|e| Error::io(path.display().to_string(), e))?
            }
            Err(e) => return Err(Error::io(path.display().to_string(), e)),
        };
        file.set_len(blocks as u64 * crate::crc::BLOCK_SIZE as u64)
            .map_err(|e| Error::io(path.display().to_string(), e))?;
        let s = Segment::new(id, stream, path, file);
        s.sealed.store(true, Ordering::Release);
        s.used_blocks.store(blocks, Ordering::Release);
        *s.resident.lock() = Some(vec![0; frames_words(blocks)]);
        Ok(s)
    }

    /// Which frames hold data, from the file's extents (after a restart).
    pub fn scan_residency(&self) -> Vec<u64> {
        let blocks = self.used_blocks.load(Ordering::Acquire);
        let mut bits = vec![0u64; frames_words(blocks)];
        let fd = std::os::fd::AsRawFd::as_raw_fd(&*self.file);
        let frame = FRAME_BLOCKS as i64 * crate::crc::BLOCK_SIZE as i64;
        let end = blocks as i64 * crate::crc::BLOCK_SIZE as i64;
        let mut pos = 0i64;
        while pos < end {
            // SAFETY: plain syscalls on a valid fd.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 || data >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) }.min(end);
            let (f0, f1) = (data / frame, (hole + frame - 1) / frame);
            for f in f0..f1 {
                bits[(f / 64) as usize] |= 1 << (f % 64);
            }
            pos = hole.max(data + 1);
        }
        bits
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
