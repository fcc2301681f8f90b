//! The `BlockDevice` trait: what a front end (vhost-user-blk, NBD) needs from a disk.
//!
//! Offsets and lengths are bytes. Devices check range and alignment themselves and report
//! violations as [`DeviceError::Invalid`], so every front end maps them to its own status
//! (virtio `IOERR`, NBD `EINVAL`) in one place.

use parking_lot::RwLock;
use std::future::Future;

/// The alignment every request must respect (offset and length).
pub const SECTOR_SIZE: u64 = 512;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Misaligned, out of range or otherwise malformed request.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Write to a read-only device.
    #[error("device is read-only")]
    ReadOnly,
    /// No space left to store the data.
    #[error("no space left on device")]
    NoSpace,
    /// The operation is not supported by this device.
    #[error("operation not supported")]
    Unsupported,
    /// The device went away (deleted, restored under the client, daemon shutting down).
    #[error("device is shutting down: {0}")]
    Gone(String),
    /// Any other failure (disk error, checksum mismatch, object store error).
    #[error("I/O error: {0}")]
    Io(String),
}

impl DeviceError {
    /// The errno a POSIX-ish front end (NBD) reports.
    pub fn errno(&self) -> i32 {
        match self {
            DeviceError::Invalid(_) => 22,  // EINVAL
            DeviceError::ReadOnly => 1,     // EPERM
            DeviceError::NoSpace => 28,     // ENOSPC
            DeviceError::Unsupported => 95, // EOPNOTSUPP
            DeviceError::Gone(_) => 108,    // ESHUTDOWN
            DeviceError::Io(_) => 5,        // EIO
        }
    }
}

/// A buffer a device hands out and takes back (for O_DIRECT devices: suitably aligned).
pub trait IoBuf: AsRef<[u8]> + AsMut<[u8]> + Send + Sync + 'static {}
impl<T: AsRef<[u8]> + AsMut<[u8]> + Send + Sync + 'static> IoBuf for T {}

/// One run of a block-status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len_bytes: u64,
    /// Not allocated: reads return zeros and cost no storage.
    pub hole: bool,
}

/// The I/O of one vhost-user queue, done entirely on the queue's worker thread: the worker
/// starts requests, waits for [`QueueIo::fd`] beside the queue's kick, and completes them
/// itself, so a request never hops to another thread (the way qemu-storage-daemon runs a
/// queue in one event loop).
pub trait QueueIo: Send + Sync + 'static {
    /// Readable when I/O started on the worker thread has completions waiting.
    fn fd(&self) -> std::os::fd::RawFd;
    /// Called on the worker thread before it starts any request: its I/O goes here from
    /// now on.
    fn attach_thread(&self);
    /// Delivers the waiting completions (on the worker thread, after `fd` was readable).
    fn complete_ready(&self);
    /// The worker thread is gone with I/O in flight: from now on the runtime delivers
    /// the completions.
    fn detach(&self, rt: &tokio::runtime::Handle);
}

pub trait BlockDevice: Send + Sync + 'static {
    type Buf: IoBuf;

    /// A per-queue I/O context for a front end that runs each queue on its own thread
    /// (`None`: requests' I/O completes on the async runtime, woken from there).
    fn queue_io(&self) -> Option<std::sync::Arc<dyn QueueIo>> {
        None
    }

    fn size_bytes(&self) -> u64;

    fn read_only(&self) -> bool {
        false
    }

    /// Identifier shown to clients (virtio-blk GET_ID, NBD export description).
    fn id(&self) -> String;

    /// A buffer of `len` bytes suitable for `write`. Its contents are unspecified (it may be
    /// recycled): the caller fills all of it before writing.
    fn alloc_buf(&self, len: usize) -> Self::Buf;

    /// Reads `len` bytes at `offset`.
    fn read(
        &self,
        offset: u64,
        len: usize,
    ) -> impl Future<Output = Result<Self::Buf, DeviceError>> + Send;

    /// Writes `data` at `offset`. With `fua`, the data is durable when this returns.
    fn write(
        &self,
        offset: u64,
        data: Self::Buf,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// The range's content becomes unspecified and its storage may be released
    /// (this engine: it reads as zeros afterwards).
    fn discard(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// The range reads as zeros afterwards (storage released where whole blocks allow).
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Runs `f`, which starts several requests (polls their futures once), so that the
    /// I/O they start is handed to the disk together when `f` returns: a device on
    /// io_uring queues the submissions and makes one system call (and the kernel one
    /// device notification) for the batch. The default just runs `f`.
    fn batch<R>(&self, f: impl FnOnce() -> R) -> R {
        f()
    }

    /// Allocation status of `[offset, offset + len)`, as consecutive extents covering at
    /// least a prefix of the range.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<Extent>, DeviceError>> + Send {
        async move {
            let _ = offset;
            Ok(vec![Extent {
                len_bytes: len,
                hole: false,
            }])
        }
    }
}

/// Checks a request's alignment and range against a device of `size_bytes`.
pub fn check_range(offset: u64, len: u64, size_bytes: u64) -> Result<(), DeviceError> {
    if !offset.is_multiple_of(SECTOR_SIZE) || !len.is_multiple_of(SECTOR_SIZE) {
        return Err(DeviceError::Invalid(format!(
            "offset {offset} / length {len} not aligned to {SECTOR_SIZE} bytes"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= size_bytes => Ok(()),
        _ => Err(DeviceError::Invalid(format!(
            "range {offset}+{len} beyond the end of the device ({size_bytes} bytes)"
        ))),
    }
}

/// An in-memory device for protocol tests of front ends.
#[derive(Debug)]
pub struct MemDevice {
    name: String,
    data: RwLock<Vec<u8>>,
    read_only: bool,
}

impl MemDevice {
    pub fn new(name: &str, size_bytes: usize) -> MemDevice {
        MemDevice {
            name: name.to_string(),
            data: RwLock::new(vec![0; size_bytes]),
            read_only: false,
        }
    }

    pub fn read_only(mut self) -> MemDevice {
        self.read_only = true;
        self
    }

    /// A copy of the whole content (for assertions).
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().clone()
    }
}

impl BlockDevice for MemDevice {
    type Buf = Vec<u8>;

    fn size_bytes(&self) -> u64 {
        self.data.read().len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn id(&self) -> String {
        self.name.clone()
    }

    fn alloc_buf(&self, len: usize) -> Vec<u8> {
        vec![0; len]
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, DeviceError> {
        check_range(offset, len as u64, self.size_bytes())?;
        let d = self.data.read();
        Ok(d[offset as usize..offset as usize + len].to_vec())
    }

    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        check_range(offset, data.len() as u64, self.size_bytes())?;
        let mut d = self.data.write();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.write_zeroes(offset, len, false).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        check_range(offset, len, self.size_bytes())?;
        let mut d = self.data.write();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}
