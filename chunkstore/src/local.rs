//! The local tier: append-only segments on local disk.
//!
//! Appends reserve a contiguous run of blocks in the active segment (under a short lock),
//! then write with io_uring (O_DIRECT) with as many appends in flight as callers issue.
//! Blocks are never overwritten: superseded blocks are punched out once nothing references
//! them, and a segment whose blocks are all released is deleted.

use crate::buf::{ALIGN, AlignedBuf};
use crate::crc::{BLOCK_SIZE, block_crc};
use crate::error::{Error, Result};
use crate::segment::{self, Segment};
use crate::uring::Uring;
use parking_lot::{Mutex, RwLock};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where a block lives in the local tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockAddr {
    pub segment: u64,
    pub block: u32,
}

impl fmt::Display for BlockAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "segment {:016x} block {}", self.segment, self.block)
    }
}

#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Size of each segment file. Larger segments mean fewer files; the object tier (later)
    /// uploads sealed segments.
    pub segment_bytes: u64,
    /// Use O_DIRECT (falls back to buffered I/O where the filesystem refuses it).
    pub direct_io: bool,
    /// io_uring submission queue size; also the bound on in-flight operations.
    pub ring_entries: u32,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            segment_bytes: 64 << 20,
            direct_io: true,
            ring_entries: 256,
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct LocalStats {
    pub appended_bytes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub punched_bytes: AtomicU64,
    pub segments_created: AtomicU64,
    pub segments_removed: AtomicU64,
    pub checksum_failures: AtomicU64,
    pub syncs: AtomicU64,
}

struct AppendState {
    active: Option<Arc<Segment>>,
    next_block: u32,
    /// The active segment is preallocated up to this block.
    prealloc_block: u32,
    next_id: u64,
}

/// Preallocation step: appends stay inside preallocated space without reserving a whole
/// segment on disk up front.
const PREALLOC_BLOCKS: u32 = 2048; // 8 MiB

pub struct LocalStore {
    dir: PathBuf,
    ring: Uring,
    cfg: LocalConfig,
    direct: std::sync::atomic::AtomicBool,
    append: Mutex<AppendState>,
    segments: RwLock<HashMap<u64, Arc<Segment>>>,
    dirty: Mutex<HashSet<u64>>,
    sync_lock: tokio::sync::Mutex<()>,
    /// Sealed segments with no append in flight, not yet checked for emptiness by the owner.
    idle: Arc<Mutex<Vec<u64>>>,
    pub stats: LocalStats,
}

impl fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalStore")
            .field("dir", &self.dir)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Blocks written by one `append`, in order. Holding it keeps the segments it wrote to
/// from being deleted; drop it once the blocks are committed to the map (or abandoned).
#[derive(Debug)]
pub struct Appended {
    pub runs: Vec<(BlockAddr, u32)>,
    pub crcs: Vec<u32>,
    _guard: PendingGuard,
}

impl Appended {
    /// Each block's address, in order.
    pub fn addrs(&self) -> impl Iterator<Item = BlockAddr> + '_ {
        self.runs.iter().flat_map(|(a, n)| {
            (0..*n).map(move |i| BlockAddr {
                segment: a.segment,
                block: a.block + i,
            })
        })
    }
}

#[derive(Debug)]
struct PendingGuard {
    store_idle: Arc<Mutex<Vec<u64>>>,
    segments: Vec<Arc<Segment>>,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        for s in &self.segments {
            if s.pending.fetch_sub(1, Ordering::AcqRel) == 1 && s.sealed.load(Ordering::Acquire) {
                self.store_idle.lock().push(s.id);
            }
        }
    }
}

/// One contiguous read: `blocks` blocks at `addr` into output block `out_block`.
#[derive(Debug, Clone, Copy)]
pub struct ReadReq {
    pub addr: BlockAddr,
    pub blocks: u32,
    pub out_block: usize,
}

impl LocalStore {
    /// Opens (creating if needed) the segment directory. Existing segments are sealed;
    /// appends go to a new one.
    pub fn open(dir: &Path, cfg: LocalConfig) -> Result<LocalStore> {
        if cfg.segment_bytes < BLOCK_SIZE as u64
            || !cfg.segment_bytes.is_multiple_of(BLOCK_SIZE as u64)
        {
            return Err(Error::Invalid(format!(
                "segment size {} must be a positive multiple of {BLOCK_SIZE}",
                cfg.segment_bytes
            )));
        }
        if cfg.segment_bytes / BLOCK_SIZE as u64 > u32::MAX as u64 {
            return Err(Error::Invalid("segment size too large".into()));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
        let mut segments = HashMap::new();
        let mut max_id = 0;
        let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
        for ent in rd {
            let ent = ent.map_err(|e| Error::io(dir.display().to_string(), e))?;
            let name = ent.file_name();
            let Some(id) = name.to_str().and_then(segment::parse_file_name) else {
                continue;
            };
            let seg = Segment::open_existing(ent.path(), id, cfg.direct_io)?;
            max_id = max_id.max(id);
            segments.insert(id, Arc::new(seg));
        }
        let ring = Uring::new(cfg.ring_entries).map_err(|e| Error::io("io_uring setup", e))?;
        let idle: Vec<u64> = segments.keys().copied().collect();
        Ok(LocalStore {
            dir: dir.to_path_buf(),
            ring,
            direct: std::sync::atomic::AtomicBool::new(cfg.direct_io),
            cfg,
            append: Mutex::new(AppendState {
                active: None,
                next_block: 0,
                prealloc_block: 0,
                next_id: max_id + 1,
            }),
            segments: RwLock::new(segments),
            dirty: Mutex::new(HashSet::new()),
            sync_lock: tokio::sync::Mutex::new(()),
            idle: Arc::new(Mutex::new(idle)),
            stats: LocalStats::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn segment_blocks(&self) -> u32 {
        (self.cfg.segment_bytes / BLOCK_SIZE as u64) as u32
    }

    /// Seals the active segment: no more appends; the unused preallocated tail is released.
    fn seal_locked(&self, st: &mut AppendState) {
        if let Some(seg) = st.active.take() {
            if st.prealloc_block > st.next_block {
                let used = st.next_block as u64 * BLOCK_SIZE as u64;
                let end = st.prealloc_block as u64 * BLOCK_SIZE as u64;
                punch_sync(&seg, used, end - used);
            }
            seg.sealed.store(true, Ordering::Release);
            if seg.pending.load(Ordering::Acquire) == 0 {
                self.idle.lock().push(seg.id);
            }
        }
        st.next_block = 0;
        st.prealloc_block = 0;
    }

    /// Seals the active segment now (e.g. before uploading it).
    pub fn seal_active(&self) {
        let mut st = self.append.lock();
        self.seal_locked(&mut st);
    }

    fn reserve(&self, nblocks: u32) -> Result<Vec<(Arc<Segment>, u32, u32)>> {
        let seg_blocks = self.segment_blocks();
        let mut st = self.append.lock();
        let mut runs = Vec::new();
        let mut remaining = nblocks;
        while remaining > 0 {
            if st.active.is_none() || st.next_block >= seg_blocks {
                self.seal_locked(&mut st);
                let id = st.next_id;
                st.next_id += 1;
                let (seg, direct) =
                    Segment::create(&self.dir, id, self.direct.load(Ordering::Relaxed))?;
                if !direct && self.direct.swap(false, Ordering::Relaxed) {
                    tracing::warn!(dir = %self.dir.display(), "O_DIRECT not supported here; using buffered I/O");
                }
                let seg = Arc::new(seg);
                self.segments.write().insert(id, seg.clone());
                self.stats.segments_created.fetch_add(1, Ordering::Relaxed);
                st.active = Some(seg);
                st.next_block = 0;
                st.prealloc_block = 0;
            }
            let Some(seg) = st.active.clone() else {
                return Err(Error::Invalid("no active segment".into()));
            };
            let take = remaining.min(seg_blocks - st.next_block);
            if st.next_block + take > st.prealloc_block {
                let to = (st.next_block + take)
                    .max(st.prealloc_block + PREALLOC_BLOCKS)
                    .min(seg_blocks);
                let bs = BLOCK_SIZE as u64;
                match seg.preallocate(st.prealloc_block as u64 * bs, to as u64 * bs) {
                    Ok(()) => st.prealloc_block = to,
                    // Out of space for the preallocation: the write itself may still fit
                    // (it extends the file, or fails with ENOSPC).
                    Err(Error::NoSpace) => {}
                    Err(e) => return Err(e),
                }
            }
            seg.pending.fetch_add(1, Ordering::AcqRel);
            runs.push((seg, st.next_block, take));
            st.next_block += take;
            remaining -= take;
        }
        Ok(runs)
    }

    /// Appends the 4 KiB blocks in `buf`'s window (its start and length multiples of 4 KiB).
    pub async fn append(&self, buf: Arc<AlignedBuf>) -> Result<Appended> {
        let n = buf.len() / BLOCK_SIZE;
        let all = std::iter::once(0..n).collect::<Vec<_>>();
        self.append_ranges(buf, &all).await
    }

    /// Appends the given ranges of blocks of `buf`'s window (block indexes relative to the
    /// window start), in order, as one append.
    pub async fn append_ranges(
        &self,
        buf: Arc<AlignedBuf>,
        ranges: &[std::ops::Range<usize>],
    ) -> Result<Appended> {
        let start = buf.window_start();
        let len = buf.len();
        if !start.is_multiple_of(ALIGN) || !len.is_multiple_of(BLOCK_SIZE) {
            return Err(Error::Invalid(format!(
                "append of {len} bytes at buffer offset {start}: must be whole 4 KiB blocks"
            )));
        }
        let window_blocks = len / BLOCK_SIZE;
        if ranges
            .iter()
            .any(|r| r.start >= r.end || r.end > window_blocks)
        {
            return Err(Error::Invalid(format!(
                "append ranges {ranges:?} outside a {window_blocks}-block buffer"
            )));
        }
        let total: usize = ranges.iter().map(|r| r.len()).sum();
        if total == 0 {
            return Err(Error::Invalid("empty append".into()));
        }
        let mut crcs = Vec::with_capacity(total);
        for r in ranges {
            let bytes = &buf.as_slice()[r.start * BLOCK_SIZE..r.end * BLOCK_SIZE];
            crcs.extend(bytes.chunks(BLOCK_SIZE).map(block_crc));
        }
        let runs = self.reserve(total as u32)?;
        let guard = PendingGuard {
            store_idle: self.idle.clone(),
            segments: runs.iter().map(|(s, _, _)| s.clone()).collect(),
        };
        // Pair each reserved run with the source blocks it receives: both sequences are
        // walked in order, splitting where either ends.
        let mut sources = ranges.iter().cloned();
        let mut src = sources.next().unwrap_or(0..0);
        let mut out = Vec::with_capacity(runs.len());
        let mut first_err = None;
        for (seg, block, n) in &runs {
            let mut dst = *block;
            let mut left = *n as usize;
            while left > 0 {
                if src.is_empty() {
                    src = sources.next().unwrap_or(0..0);
                }
                let take = left.min(src.len());
                let r = self
                    .ring
                    .write_at(
                        &seg.file,
                        dst as u64 * BLOCK_SIZE as u64,
                        &buf,
                        start + src.start * BLOCK_SIZE,
                        take * BLOCK_SIZE,
                    )
                    .await;
                if let Err(e) = r {
                    first_err.get_or_insert(Error::io(seg.path.display().to_string(), e));
                }
                src.start += take;
                dst += take as u32;
                left -= take;
            }
            self.dirty.lock().insert(seg.id);
            out.push((
                BlockAddr {
                    segment: seg.id,
                    block: *block,
                },
                *n,
            ));
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        fail::fail_point!("chunkstore::append::after_write", |_| Err(Error::Injected(
            "chunkstore::append::after_write"
        )));
        self.stats
            .appended_bytes
            .fetch_add((total * BLOCK_SIZE) as u64, Ordering::Relaxed);
        Ok(Appended {
            runs: out,
            crcs,
            _guard: guard,
        })
    }

    /// Reads blocks into `out` (block `i` of `out` at byte `i * 4096` of its allocation)
    /// and verifies each block read against `expected[out_block]`.
    pub async fn read_verified(
        &self,
        reqs: &[ReadReq],
        expected: &[u32],
        out: AlignedBuf,
    ) -> (AlignedBuf, Result<()>) {
        let out = Arc::new(out);
        let res = self.read_into(reqs, &out).await;
        let out = match Arc::try_unwrap(out) {
            Ok(b) => b,
            // Unreachable: every operation returned its reference on completion. Copy
            // rather than panic should that ever change.
            Err(shared) => {
                let mut b = AlignedBuf::zeroed(shared.capacity());
                b.set_window(0, shared.capacity());
                b
            }
        };
        if let Err(e) = res {
            return (out, Err(e));
        }
        let res = self.verify(reqs, expected, &out);
        (out, res)
    }

    async fn read_into(&self, reqs: &[ReadReq], out: &Arc<AlignedBuf>) -> Result<()> {
        let mut futs = Vec::with_capacity(reqs.len());
        for r in reqs {
            let seg = self
                .segments
                .read()
                .get(&r.addr.segment)
                .cloned()
                .ok_or(Error::SegmentMissing(r.addr.segment))?;
            let bytes = r.blocks as usize * BLOCK_SIZE;
            if (r.out_block * BLOCK_SIZE)
                .checked_add(bytes)
                .is_none_or(|e| e > out.capacity())
            {
                return Err(Error::Invalid(format!(
                    "read of {} blocks into block {} overflows a {}-byte buffer",
                    r.blocks,
                    r.out_block,
                    out.capacity()
                )));
            }
            let ring = &self.ring;
            futs.push(async move {
                ring.read_at(
                    &seg.file,
                    r.addr.block as u64 * BLOCK_SIZE as u64,
                    out,
                    r.out_block * BLOCK_SIZE,
                    bytes,
                )
                .await
                .map_err(|e| Error::io(seg.path.display().to_string(), e))
            });
        }
        for r in futures::future::join_all(futs).await {
            r?;
        }
        let total: u64 = reqs
            .iter()
            .map(|r| r.blocks as u64 * BLOCK_SIZE as u64)
            .sum();
        self.stats.read_bytes.fetch_add(total, Ordering::Relaxed);
        Ok(())
    }

    fn verify(&self, reqs: &[ReadReq], expected: &[u32], out: &AlignedBuf) -> Result<()> {
        let mut full = AlignedView(out);
        for r in reqs {
            for i in 0..r.blocks as usize {
                let ob = r.out_block + i;
                let data = full.block(ob);
                let actual = block_crc(data);
                let want = expected.get(ob).copied().unwrap_or(!actual);
                if actual != want {
                    self.stats.checksum_failures.fetch_add(1, Ordering::Relaxed);
                    return Err(Error::Checksum {
                        addr: BlockAddr {
                            segment: r.addr.segment,
                            block: r.addr.block + i as u32,
                        },
                        expected: want,
                        actual,
                    });
                }
            }
        }
        let _ = &mut full;
        Ok(())
    }

    /// Makes every completed append durable. Concurrent calls serialise, so a call returns
    /// only after every append that completed before it started is on stable storage.
    pub async fn sync(&self) -> Result<()> {
        let _g = self.sync_lock.lock().await;
        fail::fail_point!("chunkstore::sync", |_| Err(Error::Injected(
            "chunkstore::sync"
        )));
        let ids: Vec<u64> = std::mem::take(&mut *self.dirty.lock())
            .into_iter()
            .collect();
        let segs: Vec<Arc<Segment>> = {
            let map = self.segments.read();
            ids.iter().filter_map(|id| map.get(id).cloned()).collect()
        };
        let futs = segs.iter().map(|s| self.ring.sync(&s.file, true));
        let results = futures::future::join_all(futs).await;
        for (s, r) in segs.iter().zip(results) {
            if let Err(e) = r {
                // Keep them dirty: the next sync retries.
                self.dirty.lock().extend(ids.iter().copied());
                return Err(Error::io(format!("fdatasync {}", s.path.display()), e));
            }
        }
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Releases the disk space of blocks nothing references any more.
    pub async fn punch(&self, mut addrs: Vec<BlockAddr>) -> Result<()> {
        addrs.sort_unstable();
        addrs.dedup();
        let mut i = 0;
        while i < addrs.len() {
            let start = addrs[i];
            let mut n = 1u32;
            while i + (n as usize) < addrs.len() {
                let next = addrs[i + n as usize];
                if next.segment == start.segment && next.block == start.block + n {
                    n += 1;
                } else {
                    break;
                }
            }
            i += n as usize;
            let Some(seg) = self.segments.read().get(&start.segment).cloned() else {
                continue; // already deleted
            };
            fail::fail_point!("chunkstore::punch", |_| Err(Error::Injected(
                "chunkstore::punch"
            )));
            let bytes = n as u64 * BLOCK_SIZE as u64;
            self.ring
                .fallocate(
                    &seg.file,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    start.block as u64 * BLOCK_SIZE as u64,
                    bytes,
                )
                .await
                .map_err(|e| Error::io(format!("punch {}", seg.path.display()), e))?;
            self.stats.punched_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Is the segment sealed with no append in flight (so its reference count can only fall)?
    pub fn is_idle(&self, id: u64) -> bool {
        self.segments.read().get(&id).is_some_and(|s| {
            s.sealed.load(Ordering::Acquire) && s.pending.load(Ordering::Acquire) == 0
        })
    }

    /// Deletes an idle segment the owner found unreferenced. Returns false (and keeps it)
    /// if it is not idle. Reads through already-open handles keep working.
    pub fn remove_segment(&self, id: u64) -> Result<bool> {
        let seg = {
            let mut map = self.segments.write();
            match map.get(&id) {
                Some(s)
                    if s.sealed.load(Ordering::Acquire)
                        && s.pending.load(Ordering::Acquire) == 0 =>
                {
                    map.remove(&id)
                }
                Some(_) => return Ok(false),
                None => return Ok(true),
            }
        };
        if let Some(seg) = seg {
            seg.removed.store(true, Ordering::Release);
            self.dirty.lock().remove(&id);
            match std::fs::remove_file(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(seg.path.display().to_string(), e)),
            }
            self.stats.segments_removed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(true)
    }

    /// Segments that became idle since the last call (the owner checks whether they still
    /// hold referenced blocks and removes those that do not).
    pub fn take_idle(&self) -> Vec<u64> {
        std::mem::take(&mut *self.idle.lock())
    }

    /// Releases preallocated space past the last written block of every idle segment (left
    /// behind by a crash of the process that was appending to it).
    pub fn trim_tails(&self) {
        let segs: Vec<Arc<Segment>> = self.segments.read().values().cloned().collect();
        for s in segs {
            if !s.sealed.load(Ordering::Acquire) {
                continue;
            }
            let end = s.data_end().div_ceil(BLOCK_SIZE as u64) * BLOCK_SIZE as u64;
            let file_len = s.file.metadata().map(|m| m.len()).unwrap_or(0);
            if end < file_len && s.allocated_bytes() > end {
                punch_sync(&s, end, file_len - end);
            }
        }
    }

    pub fn segment_ids(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.segments.read().keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Bytes the segment files occupy on disk.
    pub fn allocated_bytes(&self) -> u64 {
        let segs: Vec<Arc<Segment>> = self.segments.read().values().cloned().collect();
        segs.iter().map(|s| s.allocated_bytes()).sum()
    }

    pub fn direct_io(&self) -> bool {
        self.direct.load(Ordering::Relaxed)
    }
}

/// Block-indexed view over a whole buffer allocation (independent of its window).
struct AlignedView<'a>(&'a AlignedBuf);

impl AlignedView<'_> {
    fn block(&mut self, i: usize) -> &[u8] {
        let ptr = self.0.io_ptr(i * BLOCK_SIZE, BLOCK_SIZE);
        // SAFETY: the range lies within the allocation (io_ptr checks) and all I/O into the
        // buffer has completed.
        unsafe { std::slice::from_raw_parts(ptr, BLOCK_SIZE) }
    }
}

fn punch_sync(seg: &Segment, offset: u64, len: u64) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&*seg.file);
    // SAFETY: plain syscall on a valid fd.
    let r = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
    };
    if r != 0 {
        tracing::warn!(
            segment = seg.id,
            "punch hole failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn cfg(segment_bytes: u64) -> LocalConfig {
        LocalConfig {
            segment_bytes,
            ..Default::default()
        }
    }

    fn pattern(nblocks: usize, seed: u8) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(nblocks * BLOCK_SIZE);
        for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
            *x = seed.wrapping_add((i / BLOCK_SIZE) as u8).wrapping_mul(31) ^ (i as u8);
        }
        b
    }

    async fn read_back(store: &LocalStore, a: &Appended) -> Result<AlignedBuf> {
        let mut reqs = Vec::new();
        let mut out_block = 0;
        for (addr, n) in &a.runs {
            reqs.push(ReadReq {
                addr: *addr,
                blocks: *n,
                out_block,
            });
            out_block += *n as usize;
        }
        let out = AlignedBuf::zeroed(out_block * BLOCK_SIZE);
        let (out, r) = store.read_verified(&reqs, &a.crcs, out).await;
        r.map(|_| out)
    }

    #[tokio::test]
    async fn append_read_roundtrip_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), cfg(16 * 4096)).unwrap();
        let mut all = Vec::new();
        for seed in 0..5u8 {
            let data = pattern(7, seed);
            let expect = data.as_slice().to_vec();
            let a = store.append(Arc::new(data)).await.unwrap();
            assert_eq!(a.addrs().count(), 7);
            all.push((a, expect));
        }
        // 35 blocks in 16-block segments: at least three segments, some appends split.
        assert!(store.segment_ids().len() >= 3);
        assert!(all.iter().any(|(a, _)| a.runs.len() > 1));
        for (a, expect) in &all {
            assert_eq!(read_back(&store, a).await.unwrap().as_slice(), &expect[..]);
        }
        store.sync().await.unwrap();
    }

    #[tokio::test]
    async fn corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), cfg(1 << 20)).unwrap();
        let a = store.append(Arc::new(pattern(2, 9))).await.unwrap();
        let (addr, _) = a.runs[0];
        // Flip one byte of the second block behind the store's back.
        let path = dir.path().join(segment::file_name(addr.segment));
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_at(&[0xff], (addr.block as u64 + 1) * 4096 + 100)
            .unwrap();
        f.sync_all().unwrap();
        match read_back(&store, &a).await {
            Err(Error::Checksum { addr: bad, .. }) => assert_eq!(bad.block, addr.block + 1),
            other => panic!("expected checksum error, got {other:?}"),
        }
        assert_eq!(store.stats.checksum_failures.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn punch_and_remove_release_space() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), cfg(64 * 4096)).unwrap();
        let a = store.append(Arc::new(pattern(64, 1))).await.unwrap();
        store.sync().await.unwrap();
        let before = store.allocated_bytes();
        assert!(before >= 64 * 4096, "allocated {before}");
        let addrs: Vec<BlockAddr> = a.addrs().take(32).collect();
        store.punch(addrs).await.unwrap();
        let after = store.allocated_bytes();
        assert!(after <= before - 32 * 4096, "before {before} after {after}");
        // The segment is full but still active until the next append seals it.
        let seg = a.runs[0].0.segment;
        drop(a);
        store.seal_active();
        assert!(store.is_idle(seg));
        assert!(store.take_idle().contains(&seg));
        assert!(store.remove_segment(seg).unwrap());
        assert_eq!(store.allocated_bytes(), 0);
        assert!(!dir.path().join(segment::file_name(seg)).exists());
    }

    #[tokio::test]
    async fn pending_appends_block_removal() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), cfg(1 << 20)).unwrap();
        let a = store.append(Arc::new(pattern(1, 1))).await.unwrap();
        let seg = a.runs[0].0.segment;
        store.seal_active();
        assert!(!store.is_idle(seg), "an uncommitted append keeps it busy");
        assert!(!store.remove_segment(seg).unwrap());
        drop(a);
        assert!(store.take_idle().contains(&seg));
        assert!(store.remove_segment(seg).unwrap());
    }

    #[tokio::test]
    async fn reopen_reads_old_segments_and_appends_to_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (runs, crcs, expect) = {
            let store = LocalStore::open(dir.path(), cfg(1 << 20)).unwrap();
            let data = pattern(3, 4);
            let expect = data.as_slice().to_vec();
            let a = store.append(Arc::new(data)).await.unwrap();
            store.sync().await.unwrap();
            (a.runs.clone(), a.crcs.clone(), expect)
        };
        let store = LocalStore::open(dir.path(), cfg(1 << 20)).unwrap();
        store.trim_tails();
        let reqs = vec![ReadReq {
            addr: runs[0].0,
            blocks: 3,
            out_block: 0,
        }];
        let (out, r) = store
            .read_verified(&reqs, &crcs, AlignedBuf::zeroed(3 * 4096))
            .await;
        r.unwrap();
        assert_eq!(out.as_slice(), &expect[..]);
        // Trimming the crashed segment's preallocated tail kept the data.
        assert!(store.allocated_bytes() < (1 << 20));
        let b = store.append(Arc::new(pattern(1, 5))).await.unwrap();
        assert_ne!(b.runs[0].0.segment, runs[0].0.segment);
    }

    #[tokio::test]
    async fn append_ranges_packs_the_chosen_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), cfg(4 * 4096)).unwrap();
        let data = pattern(8, 3);
        let src = data.as_slice().to_vec();
        let a = store
            .append_ranges(Arc::new(data), &[1..3, 4..8])
            .await
            .unwrap();
        assert_eq!(a.addrs().count(), 6);
        let back = read_back(&store, &a).await.unwrap();
        let mut expect = src[4096..3 * 4096].to_vec();
        expect.extend_from_slice(&src[4 * 4096..]);
        assert_eq!(back.as_slice(), &expect[..]);
    }

    #[tokio::test]
    async fn rejects_partial_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), cfg(1 << 20)).unwrap();
        let mut b = AlignedBuf::zeroed(4096);
        b.set_window(0, 512);
        assert!(matches!(
            store.append(Arc::new(b)).await,
            Err(Error::Invalid(_))
        ));
    }
}
