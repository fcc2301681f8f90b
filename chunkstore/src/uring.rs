//! A small io_uring reactor shared by every segment file.
//!
//! Submitters (any thread, async or not) push an SQE under `sq_lock` and submit at once.
//! One completion thread waits in `io_uring_enter(GETEVENTS)`, drains the CQ and completes
//! each operation's oneshot channel, handing back the resources the kernel was using
//! (buffers, files). Those resources live in the operation's slot until its completion, so
//! a caller that stops waiting (a dropped future) can never free memory the kernel still
//! writes to. In-flight operations are bounded by a semaphore sized to the ring, so the
//! completion queue never overflows.

use crate::buf::AlignedBuf;
use io_uring::{IoUring, opcode, squeue, types};
use parking_lot::Mutex;
use slab::Slab;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// Everything an operation's kernel side touches, kept alive until it completes.
#[derive(Debug)]
pub struct OpResources {
    _file: Option<Arc<File>>,
    _buf: Option<Arc<AlignedBuf>>,
    _permit: Option<OwnedSemaphorePermit>,
}

struct Slot {
    done: oneshot::Sender<(i32, OpResources)>,
    res: OpResources,
}

struct Inner {
    ring: IoUring,
    sq_lock: Mutex<()>,
    slots: Mutex<Slab<Slot>>,
    permits: Arc<Semaphore>,
    stopping: AtomicBool,
}

/// Handle to the reactor; cheap to clone. The completion thread stops when the last
/// handle is dropped.
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
        let nop = opcode::Nop::new().build().user_data(STOP_TOKEN);
        if self.inner.push(&nop).is_ok()
            && let Some(t) = self.thread.lock().take()
        {
            let _ = t.join();
        }
    }
}

impl Inner {
    fn push(&self, sqe: &squeue::Entry) -> io::Result<()> {
        let _g = self.sq_lock.lock();
        loop {
            // SAFETY: only this function touches the submission queue, under sq_lock; the
            // completion thread only uses the completion queue.
            let pushed = unsafe { self.ring.submission_shared().push(sqe) };
            match pushed {
                Ok(()) => break,
                // Full: hand what is queued to the kernel and retry.
                Err(_) => {
                    self.ring.submitter().submit()?;
                }
            }
        }
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

    fn run_completions(&self) {
        loop {
            match self.ring.submitter().submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
                Err(e) => {
                    tracing::error!("io_uring wait failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            let mut done = Vec::new();
            {
                // SAFETY: the completion queue is only ever accessed from this thread.
                let cq = unsafe { self.ring.completion_shared() };
                for cqe in cq {
                    done.push((cqe.user_data(), cqe.result()));
                }
            }
            let mut stop = false;
            {
                let mut slots = self.slots.lock();
                for (token, result) in done {
                    if token == STOP_TOKEN {
                        stop = true;
                        continue;
                    }
                    if let Some(slot) = slots.try_remove(token as usize) {
                        let _ = slot.done.send((result, slot.res));
                    }
                }
            }
            if stop && self.slots.lock().is_empty() {
                return;
            }
            if stop {
                // Operations still in flight: re-arm the stop token behind them.
                let nop = opcode::Nop::new().build().user_data(STOP_TOKEN);
                let _ = self.push(&nop);
            }
        }
    }
}

impl Uring {
    /// A ring with `entries` submission slots (rounded up to a power of two by the kernel).
    pub fn new(entries: u32) -> io::Result<Uring> {
        let ring = IoUring::builder().build(entries)?;
        let inner = Arc::new(Inner {
            ring,
            sq_lock: Mutex::new(()),
            slots: Mutex::new(Slab::with_capacity(entries as usize)),
            permits: Arc::new(Semaphore::new(entries as usize)),
            stopping: AtomicBool::new(false),
        });
        let worker = inner.clone();
        let thread = std::thread::Builder::new()
            .name("chunkstore-uring".into())
            .spawn(move || worker.run_completions())?;
        Ok(Uring {
            _stopper: Arc::new(Stopper {
                inner: inner.clone(),
                thread: Mutex::new(Some(thread)),
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
        let permit = self.inner.permits.clone().acquire_owned().await.ok();
        let (tx, rx) = oneshot::channel();
        let res = OpResources {
            _file: file,
            _buf: buf,
            _permit: permit,
        };
        let token = {
            let mut slots = self.inner.slots.lock();
            slots.insert(Slot { done: tx, res })
        };
        if let Err(e) = self.inner.push(&sqe.user_data(token as u64)) {
            let slot = self.inner.slots.lock().try_remove(token);
            let res = slot.map(|s| s.res).unwrap_or(OpResources {
                _file: None,
                _buf: None,
                _permit: None,
            });
            return (Err(e), res);
        }
        match rx.await {
            Ok((r, res)) if r < 0 => (Err(io::Error::from_raw_os_error(-r)), res),
            Ok((r, res)) => (Ok(r as u32), res),
            Err(_) => (
                Err(io::Error::other("io_uring reactor stopped")),
                OpResources {
                    _file: None,
                    _buf: None,
                    _permit: None,
                },
            ),
        }
    }

    /// Reads `len` bytes at `offset` of `file` into `buf[buf_off..buf_off + len]`, looping
    /// over short reads. Bytes past end of file read as zeros.
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
                0 => break, // EOF: the rest stays as it is (zeroed buffers read as holes)
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
