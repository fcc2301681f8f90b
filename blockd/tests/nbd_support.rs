//! Shared by the NBD test binaries (`#[path]`-included): exports over instrumented
//! in-memory devices, and an in-process server on a Unix socket in a temporary directory.
// Each test binary uses a different subset; test support types need no Debug.
#![allow(dead_code, missing_debug_implementations)]
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use blockd::nbd::{AttachError, Attachment, Exports, NbdServer, ServerConfig};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use vhost_blk::{BlockDevice, DeviceError, Extent, MemDevice, check_range};

pub const MIB: usize = 1 << 20;
/// Granularity of [`TestDevice`]'s allocation answers.
pub const HOLE_BLOCK: u64 = 4096;

/// A [`MemDevice`] that counts calls, can hold requests at one offset until a gate opens,
/// and answers block status from its content (an all-zero 4 KiB block is a hole).
pub struct TestDevice {
    pub mem: MemDevice,
    gate_offset: Mutex<Option<u64>>,
    gate: watch::Sender<bool>,
    /// Reads at this offset panic (a bug in the device, for the server's containment).
    panic_offset: Mutex<Option<u64>>,
    pub reads_started: AtomicU64,
    pub writes_started: AtomicU64,
    pub alloc_bufs: AtomicU64,
    pub flushes: AtomicU64,
}

impl TestDevice {
    pub fn new(name: &str, size: usize) -> TestDevice {
        Self::from_mem(MemDevice::new(name, size))
    }

    pub fn read_only(name: &str, size: usize) -> TestDevice {
        Self::from_mem(MemDevice::new(name, size).read_only())
    }

    fn from_mem(mem: MemDevice) -> TestDevice {
        TestDevice {
            mem,
            gate_offset: Mutex::new(None),
            gate: watch::channel(true).0,
            panic_offset: Mutex::new(None),
            reads_started: AtomicU64::new(0),
            writes_started: AtomicU64::new(0),
            alloc_bufs: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        }
    }

    /// From now on, reads and writes at `offset` wait until [`TestDevice::open_gate`].
    pub fn close_gate(&self, offset: u64) {
        *self.gate_offset.lock() = Some(offset);
        self.gate.send_replace(false);
    }

    /// From now on, reads at `offset` panic.
    pub fn panic_at(&self, offset: u64) {
        *self.panic_offset.lock() = Some(offset);
    }

    pub fn open_gate(&self) {
        self.gate.send_replace(true);
    }

    async fn pass_gate(&self, offset: u64) {
        if *self.gate_offset.lock() != Some(offset) {
            return;
        }
        let mut rx = self.gate.subscribe();
        // The sender lives as long as the device.
        let _ = rx.wait_for(|open| *open).await;
    }
}

impl BlockDevice for TestDevice {
    type Buf = Vec<u8>;

    fn size_bytes(&self) -> u64 {
        self.mem.size_bytes()
    }

    fn read_only(&self) -> bool {
        BlockDevice::read_only(&self.mem)
    }

    fn id(&self) -> String {
        format!("test device {}", self.mem.id())
    }

    fn alloc_buf(&self, len: usize) -> Vec<u8> {
        self.alloc_bufs.fetch_add(1, Ordering::SeqCst);
        self.mem.alloc_buf(len)
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, DeviceError> {
        self.reads_started.fetch_add(1, Ordering::SeqCst);
        if *self.panic_offset.lock() == Some(offset) {
            panic!("test device: injected panic on a read at {offset}");
        }
        self.pass_gate(offset).await;
        self.mem.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        self.writes_started.fetch_add(1, Ordering::SeqCst);
        self.pass_gate(offset).await;
        self.mem.write(offset, data, fua).await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.mem.flush().await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.mem.discard(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        self.mem.write_zeroes(offset, len, fua).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        check_range(offset, len, self.size_bytes())?;
        let data = self.mem.snapshot();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let block_end = ((pos / HOLE_BLOCK + 1) * HOLE_BLOCK).min(end);
            let hole = data[pos as usize..block_end as usize]
                .iter()
                .all(|b| *b == 0);
            match out.last_mut() {
                Some(last) if last.hole == hole => last.len_bytes += block_end - pos,
                _ => out.push(Extent {
                    len_bytes: block_end - pos,
                    hole,
                }),
            }
            pos = block_end;
        }
        Ok(out)
    }
}

struct Entry {
    device: Arc<TestDevice>,
    token: CancellationToken,
}

/// Exports by name. An unlisted `busy` export always refuses with [`AttachError::Busy`].
#[derive(Default)]
pub struct TestExports {
    entries: Mutex<HashMap<String, Entry>>,
    /// Attachments currently alive (guards not yet dropped).
    pub attached: Arc<AtomicUsize>,
    pub attach_calls: AtomicUsize,
}

struct AttachGuard(Arc<AtomicUsize>);

impl Drop for AttachGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TestExports {
    pub fn add(&self, name: &str, device: TestDevice) -> Arc<TestDevice> {
        let device = Arc::new(device);
        self.entries.lock().insert(
            name.to_string(),
            Entry {
                device: device.clone(),
                token: CancellationToken::new(),
            },
        );
        device
    }

    /// Closes every connection to `name` (as a forced restore would).
    pub fn kick(&self, name: &str) {
        if let Some(e) = self.entries.lock().get_mut(name) {
            e.token.cancel();
            e.token = CancellationToken::new();
        }
    }

    pub fn device(&self, name: &str) -> Arc<TestDevice> {
        self.entries.lock()[name].device.clone()
    }

    pub fn attached(&self) -> usize {
        self.attached.load(Ordering::SeqCst)
    }
}

impl Exports for TestExports {
    type Device = TestDevice;

    async fn attach(&self, name: &str) -> Result<Attachment<TestDevice>, AttachError> {
        self.attach_calls.fetch_add(1, Ordering::SeqCst);
        if name == "busy" {
            return Err(AttachError::Busy("attached to vm-1".into()));
        }
        let entries = self.entries.lock();
        let e = entries
            .get(name)
            .ok_or_else(|| AttachError::Unknown(name.to_string()))?;
        self.attached.fetch_add(1, Ordering::SeqCst);
        Ok(Attachment {
            device: e.device.clone(),
            shutdown: e.token.clone(),
            guard: Box::new(AttachGuard(self.attached.clone())),
        })
    }

    fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = self.entries.lock().keys().cloned().collect();
        names.sort();
        names
    }
}

/// An NBD server on a Unix socket in a temporary directory.
pub struct TestServer {
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub exports: Arc<TestExports>,
    pub server: NbdServer<TestExports>,
    pub shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub async fn start(exports: TestExports) -> TestServer {
        Self::start_with(exports, ServerConfig::default()).await
    }

    pub async fn start_with(exports: TestExports, config: ServerConfig) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("nbd.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let exports = Arc::new(exports);
        let server = NbdServer::with_config(exports.clone(), config);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let server = server.clone();
            let shutdown = shutdown.clone();
            async move { server.serve_unix(listener, shutdown).await }
        });
        TestServer {
            _dir: dir,
            socket,
            exports,
            server,
            shutdown,
            task,
        }
    }

    /// The URI qemu and libnbd tools take.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Cancels the server and waits for it (and all its connections) to finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("server did not stop")
            .expect("server task failed");
    }
}

/// Polls `cond` until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A deterministic, non-repeating pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8 ^ seed)
        .collect()
}
