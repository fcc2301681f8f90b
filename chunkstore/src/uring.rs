//! A small io_uring reactor shared by every segment file.
//!
//! Submitters (any thread, async or not) push an SQE under `sq_lock` and submit at once.
//! Completions are drained by one consumer at a time and complete each operation's
//! oneshot channel, handing back the resources the kernel was using (buffers, files).
//! Those resources live in the operation's slot until its completion, so a caller that
//! stops waiting (a dropped future) can never free memory the kernel still writes to.
//!
//! Inside a tokio runtime the ring signals an eventfd that a runtime task awaits, so a
//! request's submission, completion and continuation stay on the runtime's threads (no
//! extra thread hop per I/O). Outside one, a dedicated thread waits in
//! `io_uring_enter(GETEVENTS)`. In-flight operations are bounded by a semaphore sized to
//! the ring, so the completion queue never overflows.

use crate::buf::AlignedBuf;
use io_uring::{IoUring, opcode, squeue, types};
use parking_lot::Mutex;
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// Everything an operation's kernel side touches, kept alive until it completes.
#[derive(Debug, Default)]
pub struct OpResources {
    _file: Option<Arc<File>>,
    _bufs: Vec<Arc<AlignedBuf>>,
    _iov: Option<IoVecs>,
    _permit: Option<OwnedSemaphorePermit>,
}

/// The iovec array of a vectored write (its pointers point into `_bufs`).
#[derive(Debug)]
struct IoVecs {
    _iov: Box<[libc::iovec]>,
}
// SAFETY: the iovecs only point into buffers kept alive beside them in the same
// OpResources; nothing reads or writes through them from Rust.
unsafe impl Send for IoVecs {}

struct Slot {
    done: oneshot::Sender<(i32, OpResources)>,
    res: OpResources,
}

struct Inner {
    ring: IoUring,
    sq_lock: Mutex<()>,
    /// Held while draining the completion queue (one consumer at a time).
    cq_lock: Mutex<()>,
    slots: Mutex<Slab<Slot>>,
    permits: Arc<Semaphore>,
    stopping: AtomicBool,
    /// A runtime task drains the completions (tokio mode, or a polled ring handed over).
    driven: AtomicBool,
    /// Signalled by the kernel for every completion (tokio and polled modes).
    eventfd: Option<OwnedFd>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Operations still in flight when the ring goes away may complete after the fd is
        // closed (the kernel finishes them asynchronously): keep their memory alive.
        let slots = std::mem::take(&mut *self.slots.lock());
        if !slots.is_empty() {
            std::mem::forget(slots);
        }
    }
}

/// Handle to the reactor; cheap to clone. The driver stops when the last handle is dropped.
#[derive(Clone)]
pub struct Uring {
    inner: Arc<Inner>,
    _stopper: Arc<Stopper>,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring").finish_non_exhaustive()
    }
}

const STOP_TOKEN: u64 = u64::MAX;

struct Stopper {
    inner: Arc<Inner>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.inner.stopping.store(true, Ordering::Release);
        if let Some(fd) = &self.inner.eventfd {
            // Wake the runtime task so it notices `stopping`.
            let one = 1u64.to_ne_bytes();
            // SAFETY: writing 8 bytes from a valid buffer to an eventfd we own.
            unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
            return;
        }
        let nop = opcode::Nop::new().build().user_data(STOP_TOKEN);
        // Submitted at once, even on a plugged thread: the join below waits for it.
        if self
            .inner
            .queue(&nop)
            .and_then(|()| self.inner.submit_queued())
            .is_ok()
            && let Some(t) = self.thread.lock().take()
        {
            let _ = t.join();
        }
    }
}

thread_local! {
    /// Depth of [`Uring::plug`] guards alive on this thread.
    static PLUG_DEPTH: Cell<u32> = const { Cell::new(0) };
    /// Rings with entries this thread queued but did not submit while plugged.
    static PLUGGED: RefCell<Vec<Arc<Inner>>> = const { RefCell::new(Vec::new()) };
}

/// Submits what this thread queued while plugged when the outermost guard goes away.
#[derive(Debug)]
pub struct PlugGuard {
    // Not Send: the plug is this thread's.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for PlugGuard {
    fn drop(&mut self) {
        let depth = PLUG_DEPTH.with(|d| {
            let n = d.get().saturating_sub(1);
            d.set(n);
            n
        });
        if depth > 0 {
            return;
        }
        let rings = PLUGGED.with(|p| std::mem::take(&mut *p.borrow_mut()));
        for ring in rings {
            if let Err(e) = ring.submit_queued() {
                // The entries stay in the submission queue; the next submission on this
                // ring (any thread) hands them to the kernel.
                tracing::warn!("io_uring submit failed: {e}");
            }
        }
    }
}

impl Inner {
    fn new(entries: u32, with_eventfd: bool) -> io::Result<Arc<Inner>> {
        let ring = IoUring::builder().build(entries)?;
        let eventfd = if with_eventfd {
            // SAFETY: plain syscall; the returned fd is owned below.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fd is a fresh, valid descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            ring.submitter().register_eventfd(fd.as_raw_fd())?;
            Some(fd)
        } else {
            None
        };
        Ok(Arc::new(Inner {
            ring,
            sq_lock: Mutex::new(()),
            cq_lock: Mutex::new(()),
            slots: Mutex::new(Slab::with_capacity(entries as usize)),
            permits: Arc::new(Semaphore::new(entries as usize)),
            stopping: AtomicBool::new(false),
            driven: AtomicBool::new(false),
            eventfd,
        }))
    }

    fn push(self: &Arc<Self>, sqe: &squeue::Entry) -> io::Result<()> {
        if PLUG_DEPTH.with(Cell::get) > 0 {
            self.queue(sqe)?;
            PLUGGED.with(|p| {
                let mut p = p.borrow_mut();
                if !p.iter().any(|r| Arc::ptr_eq(r, self)) {
                    p.push(self.clone());
                }
            });
            return Ok(());
        }
        let _g = self.sq_lock.lock();
        self.queue_locked(sqe)?;
        self.submit_locked()
    }

    /// Puts an entry in the submission queue without submitting it (unless the queue is
    /// full, which submits what is there).
    fn queue(&self, sqe: &squeue::Entry) -> io::Result<()> {
        let _g = self.sq_lock.lock();
        self.queue_locked(sqe)
    }

    fn submit_queued(&self) -> io::Result<()> {
        let _g = self.sq_lock.lock();
        self.submit_locked()
    }

    fn queue_locked(&self, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: only this function touches the submission queue, under sq_lock;
            // completions are only read under cq_lock.
            let pushed = unsafe { self.ring.submission_shared().push(sqe) };
            match pushed {
                Ok(()) => break,
                // Full: hand what is queued to the kernel and retry.
                Err(_) => {
                    self.ring.submitter().submit()?;
                }
            }
        }
        Ok(())
    }

    fn submit_locked(&self) -> io::Result<()> {
        loop {
            match self.ring.submitter().submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::yield_now();
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Completes every finished operation. Returns whether a stop token was seen.
    fn drain(&self) -> bool {
        let mut done = Vec::new();
        {
            let _g = self.cq_lock.lock();
            // SAFETY: the completion queue is only accessed under cq_lock.
            let cq = unsafe { self.ring.completion_shared() };
            for cqe in cq {
                done.push((cqe.user_data(), cqe.result()));
            }
        }
        let mut stop = false;
        let mut finished = Vec::with_capacity(done.len());
        {
            let mut slots = self.slots.lock();
            for (token, result) in done {
                if token == STOP_TOKEN {
                    stop = true;
                } else if let Some(slot) = slots.try_remove(token as usize) {
                    finished.push((slot, result));
                }
            }
        }
        // Wake the waiters outside the slab lock.
        for (slot, result) in finished {
            let _ = slot.done.send((result, slot.res));
        }
        stop
    }

    fn run_thread(self: &Arc<Self>) {
        loop {
            match self.ring.submitter().submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
                Err(e) => {
                    tracing::error!("io_uring wait failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            if self.drain() {
                if self.slots.lock().is_empty() {
                    return;
                }
                // Operations still in flight: re-arm the stop token behind them.
                let nop = opcode::Nop::new().build().user_data(STOP_TOKEN);
                let _ = self.queue(&nop).and_then(|()| self.submit_queued());
            }
        }
    }

    async fn run_task(self: Arc<Self>) {
        let Some(fd) = &self.eventfd else { return };
        // SAFETY: the eventfd is owned by `self` (an Arc this task holds), so it stays open
        // and the same descriptor for the whole life of `afd`, a local of this task.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                fd.as_raw_fd(),
                tokio::io::Interest::READABLE,
            )
        };
        let afd = match registered {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("io_uring eventfd registration failed: {e}");
                return;
            }
        };
        loop {
            let mut guard = match afd.readable().await {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!("io_uring eventfd wait failed: {e}");
                    return;
                }
            };
            let mut buf = [0u8; 8];
            // SAFETY: reading 8 bytes into a valid buffer from our non-blocking eventfd;
            // resets its counter before draining, so later completions signal again.
            unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
            guard.clear_ready();
            self.drain();
            if self.stopping.load(Ordering::Acquire) && self.slots.lock().is_empty() {
                return;
            }
        }
    }
}

thread_local! {
    /// The ring this thread's operations go to instead of the store's (see
    /// [`Uring::set_thread_ring`]).
    static THREAD_RING: RefCell<Option<Uring>> = const { RefCell::new(None) };
}

impl Uring {
    /// A ring whose completions nobody drains by itself: its owner waits for
    /// [`Uring::completion_fd`] to become readable and calls [`Uring::complete_ready`]
    /// (one thread doing submission and completion, like a vhost-user queue worker), until
    /// it hands the ring to a runtime with [`Uring::spawn_driver`].
    pub fn new_polled(entries: u32) -> io::Result<Uring> {
        let inner = Inner::new(entries, true)?;
        Ok(Uring {
            _stopper: Arc::new(Stopper {
                inner: inner.clone(),
                thread: Mutex::new(None),
            }),
            inner,
        })
    }

    /// Readable when completions are waiting (rings with an eventfd).
    pub fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.eventfd.as_ref().map(|fd| fd.as_raw_fd())
    }

    /// Delivers every finished operation (wakes its waiter). For polled rings.
    pub fn complete_ready(&self) {
        if let Some(fd) = &self.inner.eventfd {
            let mut buf = [0u8; 8];
            // SAFETY: reading 8 bytes into a valid buffer from our non-blocking eventfd;
            // resets its counter before draining, so later completions signal again.
            unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        }
        self.inner.drain();
    }

    /// From now on a task on `rt` drains the completions (a polled ring whose owner goes
    /// away with operations in flight). Idempotent.
    pub fn spawn_driver(&self, rt: &tokio::runtime::Handle) {
        if self.inner.eventfd.is_some() && !self.inner.driven.swap(true, Ordering::AcqRel) {
            rt.spawn(self.inner.clone().run_task());
        }
    }

    /// Makes `ring` the ring of every operation this thread starts through a
    /// [`crate::LocalStore`] (`None`: the store's own again). A thread that owns a polled
    /// ring sets it, so its I/O completes where it was started.
    pub fn set_thread_ring(ring: Option<Uring>) {
        THREAD_RING.with(|r| *r.borrow_mut() = ring);
    }

    /// This thread's ring if one is set, else `self`.
    pub(crate) fn for_this_thread(&self) -> Uring {
        THREAD_RING
            .with(|r| r.borrow().clone())
            .unwrap_or_else(|| self.clone())
    }

    /// Until the guard drops, operations this thread starts (on any ring) are queued
    /// without a system call and then submitted together: one `io_uring_enter` for a batch,
    /// so the kernel also hands the batch to the disk as one (fewer device notifications,
    /// which are costly in a VM). Callers must not wait for such an operation while holding
    /// the guard: start a batch, drop the guard, then wait.
    pub fn plug() -> PlugGuard {
        PLUG_DEPTH.with(|d| d.set(d.get() + 1));
        PlugGuard {
            _not_send: std::marker::PhantomData,
        }
    }

    /// A ring with `entries` submission slots (rounded up to a power of two by the kernel).
    /// Completions are driven by the current tokio runtime if there is one, else by a
    /// dedicated thread.
    pub fn new(entries: u32) -> io::Result<Uring> {
        let runtime = tokio::runtime::Handle::try_current().ok();
        let inner = Inner::new(entries, runtime.is_some())?;
        let thread = match runtime {
            Some(rt) => {
                inner.driven.store(true, Ordering::Release);
                rt.spawn(inner.clone().run_task());
                None
            }
            None => {
                let worker = inner.clone();
                Some(
                    std::thread::Builder::new()
                        .name("chunkstore-uring".into())
                        .spawn(move || worker.run_thread())?,
                )
            }
        };
        Ok(Uring {
            _stopper: Arc::new(Stopper {
                inner: inner.clone(),
                thread: Mutex::new(thread),
            }),
            inner,
        })
    }

    async fn submit(
        &self,
        sqe: squeue::Entry,
        file: Option<Arc<File>>,
        buf: Option<Arc<AlignedBuf>>,
    ) -> (io::Result<u32>, OpResources) {
        let res = OpResources {
            _file: file,
            _bufs: buf.into_iter().collect(),
            ..Default::default()
        };
        self.submit_with(sqe, res).await
    }

    async fn submit_with(
        &self,
        sqe: squeue::Entry,
        mut res: OpResources,
    ) -> (io::Result<u32>, OpResources) {
        res._permit = self.inner.permits.clone().acquire_owned().await.ok();
        let (tx, rx) = oneshot::channel();
        let token = {
            let mut slots = self.inner.slots.lock();
            slots.insert(Slot { done: tx, res })
        };
        if let Err(e) = self.inner.push(&sqe.user_data(token as u64)) {
            let slot = self.inner.slots.lock().try_remove(token);
            let res = slot.map(|s| s.res).unwrap_or_default();
            return (Err(e), res);
        }
        match rx.await {
            Ok((r, res)) if r < 0 => (Err(io::Error::from_raw_os_error(-r)), res),
            Ok((r, res)) => (Ok(r as u32), res),
            Err(_) => (
                Err(io::Error::other("io_uring reactor stopped")),
                OpResources::default(),
            ),
        }
    }

    /// Reads `len` bytes at `offset` of `file` into `buf[buf_off..buf_off + len]`, looping
    /// over short reads. Reading past the end of the file is an error (`UnexpectedEof`):
    /// the caller asked for blocks that should exist.
    pub async fn read_at(
        &self,
        file: &Arc<File>,
        offset: u64,
        buf: &Arc<AlignedBuf>,
        buf_off: usize,
        len: usize,
    ) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            let sqe = {
                let ptr = buf.io_ptr(buf_off + done, len - done);
                opcode::Read::new(types::Fd(file.as_raw_fd()), ptr, (len - done) as u32)
                    .offset(offset + done as u64)
                    .build()
            };
            let (r, _) = self
                .submit(sqe, Some(file.clone()), Some(buf.clone()))
                .await;
            match r? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("short read: {} of {len} bytes at offset {offset}", done),
                    ));
                }
                n => done += n as usize,
            }
        }
        Ok(())
    }

    /// Writes `buf[buf_off..buf_off + len]` at `offset` of `file`, looping over short writes.
    pub async fn write_at(
        &self,
        file: &Arc<File>,
        offset: u64,
        buf: &Arc<AlignedBuf>,
        buf_off: usize,
        len: usize,
    ) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            let sqe = {
                let ptr = buf.io_ptr(buf_off + done, len - done) as *const u8;
                opcode::Write::new(types::Fd(file.as_raw_fd()), ptr, (len - done) as u32)
                    .offset(offset + done as u64)
                    .build()
            };
            let (r, _) = self
                .submit(sqe, Some(file.clone()), Some(buf.clone()))
                .await;
            match r? {
                0 => return Err(io::Error::from_raw_os_error(libc::ENOSPC)),
                n => done += n as usize,
            }
        }
        Ok(())
    }

    /// Writes the pieces `(buffer index, offset in its allocation, length)` of `bufs`,
    /// in order, contiguously at `offset` of `file`: one vectored write (at most 1024
    /// pieces). A short write falls back to writing the rest piece by piece.
    pub async fn writev_at(
        &self,
        file: &Arc<File>,
        offset: u64,
        bufs: &[Arc<AlignedBuf>],
        pieces: &[(usize, usize, usize)],
    ) -> io::Result<()> {
        if pieces.len() > 1024 || pieces.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} pieces in one vectored write", pieces.len()),
            ));
        }
        let iov: Box<[libc::iovec]> = pieces
            .iter()
            .map(|&(b, off, len)| libc::iovec {
                iov_base: bufs[b].io_ptr(off, len).cast(),
                iov_len: len,
            })
            .collect();
        let total: usize = pieces.iter().map(|p| p.2).sum();
        let sqe = opcode::Writev::new(types::Fd(file.as_raw_fd()), iov.as_ptr(), iov.len() as u32)
            .offset(offset)
            .build();
        let res = OpResources {
            _file: Some(file.clone()),
            _bufs: bufs.to_vec(),
            _iov: Some(IoVecs { _iov: iov }),
            ..Default::default()
        };
        let (r, _) = self.submit_with(sqe, res).await;
        let written = r? as usize;
        if written == total {
            return Ok(());
        }
        // Short write (rare: ENOSPC/EIO edges): finish piece by piece.
        let mut pos = 0usize;
        for &(b, off, len) in pieces {
            let end = pos + len;
            if end > written {
                let skip = written.saturating_sub(pos);
                self.write_at(
                    file,
                    offset + (pos + skip) as u64,
                    &bufs[b],
                    off + skip,
                    len - skip,
                )
                .await?;
            }
            pos = end;
        }
        Ok(())
    }

    /// fdatasync (or fsync) through the ring.
    pub async fn sync(&self, file: &Arc<File>, datasync: bool) -> io::Result<()> {
        let fd = types::Fd(file.as_raw_fd());
        let flags = if datasync {
            types::FsyncFlags::DATASYNC
        } else {
            types::FsyncFlags::empty()
        };
        let (r, _) = self
            .submit(
                opcode::Fsync::new(fd).flags(flags).build(),
                Some(file.clone()),
                None,
            )
            .await;
        r.map(|_| ())
    }

    /// fallocate through the ring (used to punch holes).
    pub async fn fallocate(
        &self,
        file: &Arc<File>,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let fd = types::Fd(file.as_raw_fd());
        let (r, _) = self
            .submit(
                opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(mode)
                    .build(),
                Some(file.clone()),
                None,
            )
            .await;
        r.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn write_then_read_back() {
        let ring = Uring::new(64).unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[0u8; 8192]).unwrap();
        let f = Arc::new(f);
        let data = Arc::new(AlignedBuf::from_slice(&[0x5a; 4096]));
        ring.write_at(&f, 4096, &data, 0, 4096).await.unwrap();
        ring.sync(&f, true).await.unwrap();
        let out = Arc::new(AlignedBuf::zeroed(8192));
        ring.read_at(&f, 0, &out, 0, 8192).await.unwrap();
        let out = Arc::try_unwrap(out).unwrap();
        assert!(out.as_slice()[..4096].iter().all(|&b| b == 0));
        assert!(out.as_slice()[4096..].iter().all(|&b| b == 0x5a));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_in_flight() {
        let ring = Uring::new(8).unwrap();
        let f = Arc::new(tempfile::tempfile().unwrap());
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let ring = ring.clone();
            let f = f.clone();
            tasks.push(tokio::spawn(async move {
                let data = Arc::new(AlignedBuf::from_slice(&[i as u8; 4096]));
                ring.write_at(&f, i * 4096, &data, 0, 4096).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let out = Arc::new(AlignedBuf::zeroed(200 * 4096));
        ring.read_at(&f, 0, &out, 0, 200 * 4096).await.unwrap();
        let out = Arc::try_unwrap(out).unwrap();
        for i in 0..200usize {
            assert!(
                out.as_slice()[i * 4096..(i + 1) * 4096]
                    .iter()
                    .all(|&b| b == i as u8)
            );
        }
    }

    #[tokio::test]
    async fn errors_are_reported() {
        let ring = Uring::new(8).unwrap();
        let f = Arc::new(tempfile::tempfile().unwrap());
        // Misaligned buffer offset is fine for buffered I/O; a negative-mode fallocate is not.
        let err = ring.fallocate(&f, -1, 0, 4096).await.unwrap_err();
        assert!(err.raw_os_error().is_some());
    }
}
