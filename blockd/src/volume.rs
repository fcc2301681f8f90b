//! `Volume`: one virtual disk, composed of the snapshotter's block map and chunkstore's
//! segments. Implements `vhost_blk::BlockDevice`, so NBD and vhost-user-blk serve it alike.
//!
//! - Reads resolve the head's map entries, read the data runs with io_uring and verify each
//!   block's crc32c; unmapped blocks read as zeros.
//! - Writes of whole 4 KiB blocks append to the active segment and then commit the new map
//!   entries (one RocksDB batch). Writes of 512-byte-aligned partial blocks read-modify-write
//!   the edge blocks under a per-block lock.
//! - Discard and write-zeroes both record tombstones (the range reads as zeros); partial
//!   edge blocks are zeroed by read-modify-write.
//! - FLUSH (and FUA) syncs the segments written since the last flush, then RocksDB's WAL.

use crate::core::Core;
use crate::metrics::{Op, VolumeCounters};
use crate::writer::WriteQueue;
use chunkstore::{AlignedBuf, BLOCK_SIZE, ReadReq};
use snapshotter::{BlockUpdate, Mapping, PhysBlock, VolumeHandle};
use std::sync::Arc;
use std::time::Instant;
use vhost_blk::{BlockDevice, DeviceError, Extent, check_range};

/// Largest single request (matches the NBD server's limit).
pub const MAX_IO_BYTES: u64 = 32 << 20;
/// Blocks per map batch for large discards.
const ZERO_BATCH_BLOCKS: u64 = 16 << 10;
const RMW_STRIPES: usize = 64;
const BS: u64 = BLOCK_SIZE as u64;

#[derive(Debug)]
pub struct Volume {
    core: Arc<Core>,
    handle: VolumeHandle,
    size_bytes: u64,
    read_only: bool,
    rmw: Vec<tokio::sync::Mutex<()>>,
    counters: VolumeCounters,
    queue: WriteQueue,
}

pub(crate) fn to_device_error(e: impl Into<crate::error::EngineError>) -> DeviceError {
    e.into().to_device_error()
}

impl Volume {
    pub(crate) fn new(core: Arc<Core>, handle: VolumeHandle, read_only: bool) -> Volume {
        Volume {
            size_bytes: handle.size_bytes(),
            counters: core.metrics.volume(handle.name()),
            queue: WriteQueue::default(),
            core,
            handle,
            read_only,
            rmw: (0..RMW_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    pub fn name(&self) -> &str {
        self.handle.name()
    }

    pub fn is_deleted(&self) -> bool {
        self.handle.is_deleted()
    }

    fn check(&self, offset: u64, len: u64, write: bool) -> Result<(), DeviceError> {
        if self.handle.is_deleted() {
            return Err(DeviceError::Gone(format!(
                "volume {} was deleted",
                self.name()
            )));
        }
        if write && self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        if write && self.core.fenced.read().contains(self.name()) {
            // Another daemon took the volume over: this one must not write it any more.
            return Err(DeviceError::ReadOnly);
        }
        check_range(offset, len, self.size_bytes)
    }

    /// May this attachment move the volume's blocks (defragmentation)? Not when it may not
    /// write, or another daemon took the volume over.
    fn may_relocate(&self) -> bool {
        self.core.defrag.enabled()
            && !self.read_only
            && !self.handle.is_deleted()
            && !self.core.fenced.read().contains(self.name())
    }

    fn check_len(len: u64) -> Result<(), DeviceError> {
        if len > MAX_IO_BYTES {
            return Err(DeviceError::Invalid(format!(
                "request of {len} bytes exceeds the {MAX_IO_BYTES}-byte limit"
            )));
        }
        Ok(())
    }

    /// Reads whole blocks `[lba0, lba0 + n)`; the returned buffer's window is all of them.
    async fn read_blocks(&self, lba0: u64, n: usize) -> Result<AlignedBuf, DeviceError> {
        let _read = self.core.reclaim.gate.enter();
        let maps = self.handle.lookup(lba0, n).map_err(to_device_error)?;
        let mut reqs: Vec<ReadReq> = Vec::new();
        let mut expected = vec![0u32; n];
        for (i, m) in maps.iter().enumerate() {
            let Mapping::Data { phys, crc } = *m else {
                continue;
            };
            expected[i] = crc;
            ReadReq::push_block(&mut reqs, block_addr(phys), i);
        }
        // Every block is either read from disk or zero-filled here, so a recycled buffer
        // never shows earlier contents.
        let mut out = AlignedBuf::for_overwrite(n * BLOCK_SIZE);
        for (i, m) in maps.iter().enumerate() {
            if matches!(m, Mapping::Zero) {
                out.zero_range(i * BLOCK_SIZE, BLOCK_SIZE);
            }
        }
        if reqs.is_empty() {
            return Ok(out);
        }
        let (out, r) = self.core.local.read_verified(&reqs, &expected, out).await;
        r.map_err(|e| {
            tracing::error!(volume = self.name(), "read failed: {e}");
            to_device_error(e)
        })?;
        if crate::defrag::fragmented(n, reqs.len()) && self.may_relocate() {
            crate::defrag::spawn(&self.core, &self.handle, lba0, &maps, &out);
        }
        Ok(out)
    }

    /// Stores whole blocks at `lba0` through the write pipeline (grouped with concurrent
    /// writes of this volume).
    async fn write_blocks(&self, lba0: u64, buf: AlignedBuf) -> Result<(), DeviceError> {
        self.queue
            .write(
                lba0,
                buf,
                |items| self.stage_group(items),
                |staged| self.commit_group(staged),
            )
            .await
    }

    /// Writes one group's data: all-zero blocks are not stored (they are recorded as
    /// unmapped: they cost nothing and read back as zeros), the rest is appended together.
    async fn stage_group(&self, items: Vec<(u64, AlignedBuf)>) -> Result<Staged, DeviceError> {
        let mut to_append = Vec::new();
        let mut plans: Vec<(u64, Vec<bool>, Option<usize>)> = Vec::with_capacity(items.len());
        for (lba0, buf) in items {
            let zero: Vec<bool> = buf.as_slice().chunks(BLOCK_SIZE).map(is_zero).collect();
            let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
            for (i, z) in zero.iter().enumerate() {
                if *z {
                    continue;
                }
                match ranges.last_mut() {
                    Some(r) if r.end == i => r.end = i + 1,
                    _ => ranges.push(i..i + 1),
                }
            }
            let slot = (!ranges.is_empty()).then(|| {
                to_append.push((Arc::new(buf), ranges));
                to_append.len() - 1
            });
            plans.push((lba0, zero, slot));
        }
        let appended = if to_append.is_empty() {
            Vec::new()
        } else {
            self.core
                .local
                .append_many(self.handle.stream(), to_append)
                .await
                .map_err(to_device_error)?
        };
        Ok(Staged { plans, appended })
    }

    /// Records one staged group's map changes in one batch. A large group's commit runs on
    /// the blocking pool, so the queue's worker thread goes on completing other requests.
    async fn commit_group(&self, staged: Staged) -> Vec<Result<(), DeviceError>> {
        let blocks: usize = staged.plans.iter().map(|p| p.1.len()).sum();
        if blocks < OFFLOAD_COMMIT_BLOCKS {
            return Self::commit_staged(&self.core, &self.handle, staged);
        }
        let (core, handle) = (self.core.clone(), self.handle.clone());
        let n = staged.plans.len();
        match tokio::task::spawn_blocking(move || Self::commit_staged(&core, &handle, staged)).await
        {
            Ok(r) => r,
            Err(e) => vec![Err(DeviceError::Io(format!("write commit task failed: {e}"))); n],
        }
    }

    fn commit_staged(
        core: &Core,
        handle: &VolumeHandle,
        staged: Staged,
    ) -> Vec<Result<(), DeviceError>> {
        let Staged { plans, appended } = staged;
        let n = plans.len();
        let updates: Vec<(u64, Vec<BlockUpdate>)> = plans
            .iter()
            .map(|(lba0, zero, slot)| {
                let mut data = slot
                    .map(|i| &appended[i])
                    .into_iter()
                    .flat_map(|a| a.addrs().zip(a.crcs.iter().copied()));
                let u = zero
                    .iter()
                    .map(|z| match (z, if *z { None } else { data.next() }) {
                        (false, Some((a, crc))) => BlockUpdate::Data(phys_block(a), crc),
                        _ => BlockUpdate::Zero,
                    })
                    .collect();
                (*lba0, u)
            })
            .collect();
        let refs: Vec<(u64, &[BlockUpdate])> =
            updates.iter().map(|(l, u)| (*l, u.as_slice())).collect();
        match handle.commit_group(&refs) {
            Ok(commits) => {
                for c in commits {
                    core.reclaim.released(c.released);
                }
                drop(appended); // the blocks are referenced now: segments may seal and go idle
                vec![Ok(()); n]
            }
            Err(e) => vec![Err(to_device_error(e)); n],
        }
    }

    /// Locks the stripes of the given blocks (ascending, deduplicated).
    async fn lock_blocks(&self, lbas: &[u64]) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = lbas.iter().map(|l| (*l as usize) % RMW_STRIPES).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for s in stripes {
            guards.push(self.rmw[s].lock().await);
        }
        guards
    }

    /// Writes `data` (any 512-byte-aligned range) by read-modify-write of the edge blocks.
    async fn write_unaligned(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let end = offset + data.len() as u64;
        let lba0 = offset / BS;
        let lba_end = end.div_ceil(BS);
        let n = (lba_end - lba0) as usize;
        let mut edges = Vec::new();
        if !offset.is_multiple_of(BS) {
            edges.push(lba0);
        }
        if !end.is_multiple_of(BS) && !edges.contains(&(lba_end - 1)) {
            edges.push(lba_end - 1);
        }
        let _locks = self.lock_blocks(&edges).await;
        let mut merged = AlignedBuf::zeroed(n * BLOCK_SIZE);
        for &e in &edges {
            let old = self.read_blocks(e, 1).await?;
            let at = ((e - lba0) * BS) as usize;
            merged.as_mut_slice()[at..at + BLOCK_SIZE].copy_from_slice(old.as_slice());
        }
        let at = (offset - lba0 * BS) as usize;
        merged.as_mut_slice()[at..at + data.len()].copy_from_slice(data);
        self.write_blocks(lba0, merged).await
    }

    async fn zero_range(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let end = offset + len;
        let first_full = offset.div_ceil(BS);
        let last_full = end / BS;
        if first_full < last_full {
            let mut lba = first_full;
            while lba < last_full {
                let n = ZERO_BATCH_BLOCKS.min(last_full - lba);
                let commit = self
                    .handle
                    .commit_zero(lba, n as usize)
                    .map_err(to_device_error)?;
                self.core.reclaim.released(commit.released);
                lba += n;
            }
            if offset < first_full * BS {
                let z = vec![0u8; (first_full * BS - offset) as usize];
                self.write_unaligned(offset, &z).await?;
            }
            if last_full * BS < end {
                let z = vec![0u8; (end - last_full * BS) as usize];
                self.write_unaligned(last_full * BS, &z).await?;
            }
        } else if len > 0 {
            // Entirely inside one or two partial blocks.
            let z = vec![0u8; len as usize];
            self.write_unaligned(offset, &z).await?;
        }
        Ok(())
    }

    fn observe<T>(&self, op: Op, bytes: u64, start: Instant, r: &Result<T, DeviceError>) {
        self.core
            .metrics
            .observe_io(&self.counters, op, bytes, start.elapsed(), r.as_ref().err());
    }
}

impl BlockDevice for Volume {
    type Buf = AlignedBuf;

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn id(&self) -> String {
        self.name().to_string()
    }

    fn queue_io(&self) -> Option<Arc<dyn vhost_blk::QueueIo>> {
        match QueueRing::new() {
            Ok(r) => Some(Arc::new(r)),
            Err(e) => {
                tracing::warn!(
                    volume = self.name(),
                    "no io_uring of its own for a vhost-user queue (its I/O completes on the runtime): {e}"
                );
                None
            }
        }
    }

    fn batch<R>(&self, f: impl FnOnce() -> R) -> R {
        let _plug = chunkstore::Uring::plug();
        f()
    }

    fn alloc_buf(&self, len: usize) -> AlignedBuf {
        // The caller overwrites every byte (trait contract); skip zeroing recycled memory.
        AlignedBuf::for_overwrite(len)
    }

    async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, DeviceError> {
        let start = Instant::now();
        let r = async {
            self.check(offset, len as u64, false)?;
            Self::check_len(len as u64)?;
            let lba0 = offset / BS;
            let n = (offset + len as u64).div_ceil(BS) - lba0;
            let mut out = self.read_blocks(lba0, n as usize).await?;
            out.set_window((offset - lba0 * BS) as usize, len);
            Ok(out)
        }
        .await;
        self.observe(Op::Read, len as u64, start, &r);
        r
    }

    async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), DeviceError> {
        let start = Instant::now();
        let len = data.len() as u64;
        let r = async {
            self.check(offset, len, true)?;
            Self::check_len(len)?;
            if len == 0 {
            } else if offset.is_multiple_of(BS)
                && len.is_multiple_of(BS)
                && data.window_start().is_multiple_of(BLOCK_SIZE)
            {
                self.write_blocks(offset / BS, data).await?;
            } else {
                self.write_unaligned(offset, data.as_slice()).await?;
            }
            if fua {
                self.core.flush().await.map_err(to_device_error)?;
            }
            Ok(())
        }
        .await;
        self.observe(Op::Write, len, start, &r);
        r
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        let start = Instant::now();
        let r = self.core.flush().await.map_err(to_device_error);
        self.observe(Op::Flush, 0, start, &r);
        r
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let start = Instant::now();
        let r = async {
            self.check(offset, len, true)?;
            self.zero_range(offset, len).await
        }
        .await;
        self.observe(Op::Discard, len, start, &r);
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        let start = Instant::now();
        let r = async {
            self.check(offset, len, true)?;
            self.zero_range(offset, len).await?;
            if fua {
                self.core.flush().await.map_err(to_device_error)?;
            }
            Ok(())
        }
        .await;
        self.observe(Op::WriteZeroes, len, start, &r);
        r
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        self.check(offset, len, false)?;
        // Answer at most 64 MiB at a time; clients ask again for the rest.
        let len = len.min(64 << 20);
        if len == 0 {
            return Ok(Vec::new());
        }
        let lba0 = offset / BS;
        let lba_end = (offset + len).div_ceil(BS);
        let maps = self
            .handle
            .lookup(lba0, (lba_end - lba0) as usize)
            .map_err(to_device_error)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        for (i, m) in maps.iter().enumerate() {
            let block_end = ((lba0 + i as u64 + 1) * BS).min(offset + len);
            let hole = matches!(m, Mapping::Zero);
            let n = block_end - pos;
            match out.last_mut() {
                Some(last) if last.hole == hole => last.len_bytes += n,
                _ => out.push(Extent { len_bytes: n, hole }),
            }
            pos = block_end;
        }
        Ok(out)
    }
}

/// Submission slots of a vhost-user queue's ring: a queue holds at most 1024 requests, and a
/// request waits for a slot when its ring is full.
const QUEUE_RING_ENTRIES: u32 = 256;

/// A vhost-user queue's own io_uring: the queue's worker thread submits to it and polls its
/// completions, so the queue's I/O never hops to a runtime thread.
#[derive(Debug)]
struct QueueRing {
    ring: chunkstore::Uring,
    fd: std::os::fd::RawFd,
}

impl QueueRing {
    fn new() -> std::io::Result<QueueRing> {
        let ring = chunkstore::Uring::new_polled(QUEUE_RING_ENTRIES)?;
        let fd = ring
            .completion_fd()
            .ok_or_else(|| std::io::Error::other("polled ring without an eventfd"))?;
        Ok(QueueRing { ring, fd })
    }
}

impl vhost_blk::QueueIo for QueueRing {
    fn fd(&self) -> std::os::fd::RawFd {
        self.fd
    }

    fn attach_thread(&self) {
        chunkstore::Uring::set_thread_ring(Some(self.ring.clone()));
    }

    fn complete_ready(&self) {
        self.ring.complete_ready();
    }

    fn detach(&self, rt: &tokio::runtime::Handle) {
        self.ring.spawn_driver(rt);
    }
}

/// The block map's address of a stored block: the reference-counted group is the block's
/// 1 MiB chunk, so a chunk nothing references can be released as a whole.
pub(crate) fn phys_block(a: chunkstore::BlockAddr) -> PhysBlock {
    let (chunk, index) = a.chunk();
    PhysBlock {
        group: chunk.0,
        index,
    }
}

pub(crate) fn block_addr(p: PhysBlock) -> chunkstore::BlockAddr {
    chunkstore::ChunkId(p.group).block(p.index)
}

/// From this many blocks (1 MiB) on, a write group's map commit leaves the worker thread.
const OFFLOAD_COMMIT_BLOCKS: usize = 256;

/// A group's written data, waiting for its commit turn.
struct Staged {
    /// Per request: first block, which blocks are zero, index into `appended`.
    plans: Vec<(u64, Vec<bool>, Option<usize>)>,
    appended: Vec<chunkstore::Appended>,
}

/// Is this block all zeros? (Word-at-a-time; blocks are 4 KiB-aligned.)
fn is_zero(block: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: reinterpreting initialised bytes as u64 words is valid for any bit pattern;
        // align_to handles any misalignment through head/tail.
        unsafe { block.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}
