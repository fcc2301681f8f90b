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

/// Blocks per chunk: the unit of reference counting and of the object-store tier (1 MiB).
pub const CHUNK_BLOCKS: u32 = 256;
/// Segments hold at most 256 chunks (256 MiB), so a chunk id fits `segment << 8 | chunk`.
pub const MAX_SEGMENT_BYTES: u64 = 256 * CHUNK_BLOCKS as u64 * BLOCK_SIZE as u64;
/// Segment ids are `instance << 24 | counter`: the instance is random per data directory,
/// so segments created on different hosts never collide (a volume imported from the object
/// store keeps its segment ids).
const SEGMENT_COUNTER_BITS: u32 = 24;
const SEGMENT_COUNTER_MASK: u64 = (1 << SEGMENT_COUNTER_BITS) - 1;

/// A 1 MiB chunk of a segment: `segment << 8 | chunk number`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId(pub u64);

impl ChunkId {
    pub fn segment(self) -> u64 {
        self.0 >> 8
    }

    pub fn number(self) -> u32 {
        (self.0 & 0xff) as u32
    }

    /// Address of block `index` (0..256) of this chunk.
    pub fn block(self, index: u32) -> BlockAddr {
        BlockAddr {
            segment: self.segment(),
            block: self.number() * CHUNK_BLOCKS + index,
        }
    }
}

/// Reads or creates the random instance id of a data directory.
fn instance_id(dir: &Path) -> Result<u32> {
    let path = dir.join("INSTANCE");
    match std::fs::read_to_string(&path) {
        Ok(s) => s
            .trim()
            .parse::<u32>()
            .map_err(|_| Error::Invalid(format!("{} is corrupt: {s:?}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Derive from time and pid mixed through crc32c: unique enough per host, and
            // only needs to differ between the data directories sharing a bucket.
            let seed = format!(
                "{:?}{}{}",
                std::time::SystemTime::now(),
                std::process::id(),
                dir.display()
            );
            let id = crc32c::crc32c(seed.as_bytes()).max(1) & 0x7fff_ffff;
            let tmp = dir.join("INSTANCE.tmp");
            std::fs::write(&tmp, format!("{id}\n"))
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|e| Error::io(path.display().to_string(), e))?;
            Ok(id)
        }
        Err(e) => Err(Error::io(path.display().to_string(), e)),
    }
}

/// Where a block lives in the local tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockAddr {
    pub segment: u64,
    pub block: u32,
}

impl BlockAddr {
    /// The chunk holding this block and the block's index in it.
    pub fn chunk(self) -> (ChunkId, u32) {
        (
            ChunkId(self.segment << 8 | (self.block / CHUNK_BLOCKS) as u64),
            self.block % CHUNK_BLOCKS,
        )
    }
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
    /// Emptied segment files kept (as `<id>.free`) and reused for new segments instead of
    /// deleting them and preallocating new ones: appends then overwrite written blocks,
    /// which ext4 and xfs take without converting unwritten extents at every completion.
    /// 0 deletes emptied segments at once.
    pub recycle_segments: usize,
    /// With recycling on, how long released space of live segments waits before it is
    /// punched out: a segment whose blocks all die meanwhile (overwritten sequentially,
    /// its volume or checkpoint deleted) goes to the free pool whole instead of as a file
    /// full of holes. At most [`DEFER_LIMIT`] waits at a time.
    pub punch_delay: std::time::Duration,
}

/// Released space waiting for its punch (see [`LocalConfig::punch_delay`]) is punched
/// early beyond this.
pub const DEFER_LIMIT: u64 = 256 << 20;

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            segment_bytes: 64 << 20,
            direct_io: true,
            ring_entries: 256,
            recycle_segments: 0,
            punch_delay: std::time::Duration::from_secs(2),
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
    /// New segments that reused an emptied segment's file.
    pub segments_recycled: AtomicU64,
    pub checksum_failures: AtomicU64,
    pub syncs: AtomicU64,
}

/// The active segment of one append stream.
#[derive(Default)]
struct StreamState {
    active: Option<Arc<Segment>>,
    next_block: u32,
    /// The active segment is preallocated up to this block (for a recycled file: its fill
    /// record says this block).
    prealloc_block: u32,
    /// The active segment is a recycled file.
    recycled: bool,
}

/// Consecutive whole granules of one segment, to punch.
#[derive(Clone, Copy)]
struct GranuleRun {
    segment: u64,
    first: u32,
    count: u32,
}

impl GranuleRun {
    fn offset(&self) -> u64 {
        self.first as u64 * GRANULE_BYTES
    }

    fn len(&self) -> u64 {
        self.count as u64 * GRANULE_BYTES
    }
}

/// Released granules waiting for their punch, oldest first, and their total size.
#[derive(Default)]
struct Deferred {
    runs: std::collections::VecDeque<(std::time::Instant, GranuleRun)>,
    bytes: u64,
}

impl Deferred {
    fn push(&mut self, at: std::time::Instant, run: GranuleRun) {
        self.bytes += run.len();
        self.runs.push_back((at, run));
    }

    /// Takes the runs that waited `delay`, and the oldest beyond [`DEFER_LIMIT`].
    fn take_due(&mut self, now: std::time::Instant, delay: std::time::Duration) -> Vec<GranuleRun> {
        let mut due = Vec::new();
        while let Some(&(t, run)) = self.runs.front() {
            if now.duration_since(t) < delay && self.bytes <= DEFER_LIMIT {
                break;
            }
            self.runs.pop_front();
            self.bytes -= run.len();
            due.push(run);
        }
        due
    }

    /// Drops a segment's runs.
    fn forget(&mut self, segment: u64) {
        let mut freed = 0;
        self.runs.retain(|(_, run)| {
            let keep = run.segment != segment;
            if !keep {
                freed += run.len();
            }
            keep
        });
        self.bytes -= freed;
    }
}

struct AppendState {
    streams: HashMap<u64, StreamState>,
    next_id: u64,
}

/// Name suffix of free-pool files (`<old segment id>.free`).
const FREE_SUFFIX: &str = ".free";

/// Punch granularity: 16 blocks (64 KiB).
const GRANULE_BLOCKS: u32 = 16;
const GRANULE_BYTES: u64 = GRANULE_BLOCKS as u64 * BLOCK_SIZE as u64;

/// Released blocks of one segment (a bitmap).
struct DeadMap {
    bits: Vec<u64>,
}

impl DeadMap {
    fn new(blocks: u32) -> DeadMap {
        DeadMap {
            bits: vec![0; (blocks as usize).div_ceil(64)],
        }
    }

    /// Marks a block; returns whether it was newly marked.
    fn set(&mut self, block: u32) -> bool {
        let (w, b) = ((block / 64) as usize, block % 64);
        let was = self.bits[w] & (1 << b) != 0;
        self.bits[w] |= 1 << b;
        !was
    }

    fn granule_full(&self, g: u32) -> bool {
        // GRANULE_BLOCKS divides 64: a granule is a 16-bit field of one word.
        let first = g * GRANULE_BLOCKS;
        let w = self.bits[(first / 64) as usize];
        let mask = ((1u64 << GRANULE_BLOCKS) - 1) << (first % 64);
        w & mask == mask
    }
}

/// Preallocation step: appends stay inside preallocated space without reserving a whole
/// segment on disk up front.
const PREALLOC_BLOCKS: u32 = 2048; // 8 MiB

pub struct LocalStore {
    dir: PathBuf,
    /// Random id of this data directory (high bits of its segment ids).
    instance: u32,
    ring: Uring,
    cfg: LocalConfig,
    direct: std::sync::atomic::AtomicBool,
    append: Mutex<AppendState>,
    segments: RwLock<HashMap<u64, Arc<Segment>>>,
    dirty: Mutex<HashSet<u64>>,
    sync_lock: tokio::sync::Mutex<()>,
    /// Sealed segments with no append in flight, not yet checked for emptiness by the owner.
    idle: Arc<Mutex<Vec<u64>>>,
    /// Released blocks per segment, not all punched yet.
    dead: Mutex<HashMap<u64, DeadMap>>,
    /// The object-store tier, when one is configured.
    tier: std::sync::OnceLock<Arc<crate::tier::Tier>>,
    /// Bytes appended to segments not uploaded yet (meaningful with a tier).
    dirty_bytes: AtomicU64,
    /// Emptied segment files ready for reuse.
    pool: Mutex<Vec<PathBuf>>,
    deferred: Mutex<Deferred>,
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

impl ReadReq {
    /// Adds output block `out_block`, stored at `addr`, to a plan built block by block:
    /// it extends the last read when it continues it on disk and in the output.
    pub fn push_block(reqs: &mut Vec<ReadReq>, addr: BlockAddr, out_block: usize) {
        if let Some(l) = reqs.last_mut()
            && l.addr.segment == addr.segment
            && l.addr.block + l.blocks == addr.block
            && l.out_block + l.blocks as usize == out_block
        {
            l.blocks += 1;
            return;
        }
        reqs.push(ReadReq {
            addr,
            blocks: 1,
            out_block,
        });
    }
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
        if cfg.segment_bytes > MAX_SEGMENT_BYTES {
            return Err(Error::Invalid(format!(
                "segment size {} exceeds the maximum of {MAX_SEGMENT_BYTES} bytes",
                cfg.segment_bytes
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
        let instance = instance_id(dir)?;
        let mut segments = HashMap::new();
        let mut pool = Vec::new();
        let mut max_counter = 0;
        let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
        for ent in rd {
            let ent = ent.map_err(|e| Error::io(dir.display().to_string(), e))?;
            let name = ent.file_name();
            if name.to_str().is_some_and(|n| n.ends_with(FREE_SUFFIX)) {
                let keep = pool.len() < cfg.recycle_segments
                    && ent.metadata().is_ok_and(|m| m.len() == cfg.segment_bytes);
                if keep {
                    pool.push(ent.path());
                } else if let Err(e) = std::fs::remove_file(ent.path()) {
                    tracing::warn!(path = %ent.path().display(), "removing a free segment file: {e}");
                }
                continue;
            }
            let Some((id, stream)) = name.to_str().and_then(segment::parse_file_name) else {
                continue;
            };
            let seg = Segment::open_existing(ent.path(), id, stream, cfg.direct_io)?;
            if id >> SEGMENT_COUNTER_BITS == instance as u64 {
                max_counter = max_counter.max(id & SEGMENT_COUNTER_MASK);
            }
            segments.insert(id, Arc::new(seg));
        }
        let ring = Uring::new(cfg.ring_entries).map_err(|e| Error::io("io_uring setup", e))?;
        let idle: Vec<u64> = segments.keys().copied().collect();
        Ok(LocalStore {
            dir: dir.to_path_buf(),
            instance,
            ring,
            direct: std::sync::atomic::AtomicBool::new(cfg.direct_io),
            cfg,
            append: Mutex::new(AppendState {
                streams: HashMap::new(),
                next_id: ((instance as u64) << SEGMENT_COUNTER_BITS) | (max_counter + 1),
            }),
            segments: RwLock::new(segments),
            dirty: Mutex::new(HashSet::new()),
            sync_lock: tokio::sync::Mutex::new(()),
            idle: Arc::new(Mutex::new(idle)),
            dead: Mutex::new(HashMap::new()),
            tier: std::sync::OnceLock::new(),
            dirty_bytes: AtomicU64::new(0),
            pool: Mutex::new(pool),
            deferred: Mutex::new(Deferred::default()),
            stats: LocalStats::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Random id of this data directory: identifies the daemon in leases and manifests.
    pub fn instance(&self) -> u32 {
        self.instance
    }

    pub fn ring(&self) -> &Uring {
        &self.ring
    }

    /// The ring this thread's operations use: its own (see [`Uring::set_thread_ring`]) or
    /// the store's.
    fn io(&self) -> Uring {
        self.ring.for_this_thread()
    }

    pub fn segments(&self) -> Vec<Arc<Segment>> {
        self.segments.read().values().cloned().collect()
    }

    pub fn segment(&self, id: u64) -> Option<Arc<Segment>> {
        self.segments.read().get(&id).cloned()
    }

    pub fn tier(&self) -> Option<&Arc<crate::tier::Tier>> {
        self.tier.get()
    }

    /// Attaches the object-store tier: segments it has uploaded become remote-backed
    /// (their files cache frames), the others count as dirty.
    pub fn attach_tier(&self, tier: Arc<crate::tier::Tier>) -> Result<()> {
        let mut dirty = 0;
        for seg in self.segments() {
            match tier.meta().seg(seg.id)? {
                Some(rec) => {
                    // Evicted frames are holes, so the file's data end (what `open_existing`
                    // measured) falls short of the segment when its tail was evicted, or is
                    // 0 when all of it was: the upload record knows how long it is.
                    seg.used_blocks.fetch_max(rec.blocks, Ordering::AcqRel);
                    *seg.resident.lock() = Some(seg.scan_residency());
                }
                None => dirty += seg.used_blocks.load(Ordering::Acquire) as u64 * BLOCK_SIZE as u64,
            }
        }
        self.dirty_bytes.store(dirty, Ordering::Release);
        self.tier
            .set(tier)
            .map_err(|_| Error::Invalid("a tier is already attached".into()))
    }

    /// Bytes not uploaded yet.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes.load(Ordering::Acquire)
    }

    pub(crate) fn uploaded(&self, bytes: u64) {
        let _ = self
            .dirty_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                Some(d.saturating_sub(bytes))
            });
    }

    /// Sealed segments with no append in flight that are not uploaded yet, oldest first.
    pub fn upload_candidates(&self) -> Result<Vec<Arc<Segment>>> {
        let Some(tier) = self.tier.get() else {
            return Ok(Vec::new());
        };
        let mut out: Vec<Arc<Segment>> = self
            .segments()
            .into_iter()
            .filter(|s| s.sealed.load(Ordering::Acquire) && s.pending.load(Ordering::Acquire) == 0)
            .collect();
        out.retain(|s| !matches!(tier.uploaded(s.id), Ok(true)));
        out.sort_by_key(|s| s.id);
        Ok(out)
    }

    /// Segments of a stream not uploaded yet (sealed or not).
    pub fn stream_dirty(&self, stream: u64) -> Result<Vec<Arc<Segment>>> {
        let Some(tier) = self.tier.get() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for s in self.segments() {
            if s.stream == stream && !tier.uploaded(s.id)? {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// Drops cached frames `[first, first + n)` of a segment whose data is in the object
    /// store (the caller checked they are clean).
    /// Returns false (and evicts nothing) while reads of the segment are in flight.
    pub fn evict_frames(&self, seg: &Segment, first: u32, n: u32) -> bool {
        let fb = crate::segment::FRAME_BLOCKS as u64 * BLOCK_SIZE as u64;
        let mut r = seg.resident.lock();
        // Checked under the residency lock: a read registers before it looks at the bits,
        // so it either sees them cleared (and fetches) or is seen here.
        if seg.readers.load(Ordering::SeqCst) > 0 {
            return false;
        }
        if let Some(bits) = r.as_mut() {
            punch_sync(seg, first as u64 * fb, n as u64 * fb);
            for f in first..first + n {
                if let Some(w) = bits.get_mut((f / 64) as usize) {
                    *w &= !(1 << (f % 64));
                }
            }
        }
        true
    }

    /// The local stand-in for a segment only the object store has (created on demand).
    fn remote_segment(&self, id: u64) -> Result<Arc<Segment>> {
        if let Some(s) = self.segment(id) {
            return Ok(s);
        }
        let tier = self.tier.get().ok_or(Error::SegmentMissing(id))?;
        let rec = tier.meta().seg(id)?.ok_or(Error::SegmentMissing(id))?;
        let mut map = self.segments.write();
        if let Some(s) = map.get(&id) {
            return Ok(s.clone());
        }
        let seg = Arc::new(Segment::create_remote(
            &self.dir,
            id,
            rec.stream,
            rec.blocks,
            self.direct.load(Ordering::Relaxed),
        )?);
        map.insert(id, seg.clone());
        Ok(seg)
    }

    /// Waits while too much data is waiting for upload (writes slow down instead of
    /// filling the disk).
    async fn wait_dirty_budget(&self) {
        let Some(tier) = self.tier.get() else { return };
        let limit = tier.config().dirty_limit;
        loop {
            let notified = tier.drained.notified();
            if self.dirty_bytes() < limit {
                return;
            }
            let _ = tokio::time::timeout(std::time::Duration::from_millis(100), notified).await;
        }
    }

    fn segment_blocks(&self) -> u32 {
        (self.cfg.segment_bytes / BLOCK_SIZE as u64) as u32
    }

    /// Seals a stream's active segment: no more appends; the unused preallocated tail is
    /// released.
    fn seal_locked(&self, st: &mut StreamState) {
        if let Some(seg) = st.active.take() {
            let used = st.next_block as u64 * BLOCK_SIZE as u64;
            let end = if st.recycled {
                // The rest of the file holds an earlier segment's blocks: record the end
                // and give the whole tail back.
                if let Err(e) = seg.set_fill(st.next_block) {
                    tracing::warn!(segment = seg.id, "recording a segment's fill: {e}");
                }
                self.cfg.segment_bytes
            } else {
                st.prealloc_block as u64 * BLOCK_SIZE as u64
            };
            if end > used {
                punch_sync(&seg, used, end - used);
            }
            seg.sealed.store(true, Ordering::Release);
            if seg.pending.load(Ordering::Acquire) == 0 {
                self.idle.lock().push(seg.id);
            }
        }
        st.next_block = 0;
        st.prealloc_block = 0;
        st.recycled = false;
    }

    /// A file from the free pool, renamed to segment `id`'s name and opened (`None`: the
    /// pool is empty, or the file could not be taken: it is deleted then).
    fn take_pooled(&self, id: u64, stream: u64) -> Option<(Segment, bool)> {
        let from = self.pool.lock().pop()?;
        let to = self.dir.join(segment::file_name(id, stream));
        let r = std::fs::rename(&from, &to)
            .map_err(|e| Error::io(from.display().to_string(), e))
            .and_then(|()| {
                Segment::open_recycled(to.clone(), id, stream, self.direct.load(Ordering::Relaxed))
            });
        match r {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("reusing a free segment file failed (deleting it): {e}");
                let _ = std::fs::remove_file(&from);
                let _ = std::fs::remove_file(&to);
                None
            }
        }
    }

    /// Keeps an emptied, removed segment's file for reuse, if the pool has room and
    /// nothing reads it. Returns false when the caller should delete it instead.
    fn recycle(&self, seg: &Segment) -> bool {
        if self.cfg.recycle_segments == 0 {
            return false;
        }
        let mut pool = self.pool.lock();
        if pool.len() >= self.cfg.recycle_segments {
            return false;
        }
        // An upload pins the segment and then checks `removed` (set before this).
        if seg.readers.load(Ordering::SeqCst) > 0 {
            return false;
        }
        let fd = std::os::fd::AsRawFd::as_raw_fd(&*seg.file);
        // Fill whatever was punched, so the whole file is allocated again.
        // SAFETY: plain syscall on a valid fd.
        if unsafe { libc::fallocate(fd, 0, 0, self.cfg.segment_bytes as i64) } != 0 {
            return false;
        }
        // No data in it from now on, whatever a crash leaves of the renames.
        if let Err(e) = seg.set_fill(0) {
            tracing::debug!(segment = seg.id, "no fill record (not recycling): {e}");
            return false;
        }
        let to = self.dir.join(format!("{:016x}{FREE_SUFFIX}", seg.id));
        if std::fs::rename(&seg.path, &to).is_err() {
            return false;
        }
        pool.push(to);
        true
    }

    /// Files in the free pool.
    pub fn free_segments(&self) -> usize {
        self.pool.lock().len()
    }

    /// Gives back the disk space kept for reuse (the free pool, released space waiting for
    /// its punch): the disk is full.
    fn free_reserves(&self) {
        for p in std::mem::take(&mut *self.pool.lock()) {
            let _ = std::fs::remove_file(p);
        }
        let runs = std::mem::take(&mut *self.deferred.lock()).runs;
        for (_, run) in runs {
            if let Some(seg) = self.segment(run.segment)
                && punch_sync(&seg, run.offset(), run.len())
            {
                self.stats
                    .punched_bytes
                    .fetch_add(run.len(), Ordering::Relaxed);
            }
        }
    }

    /// Seals every stream's active segment now.
    pub fn seal_active(&self) {
        let mut ap = self.append.lock();
        for st in ap.streams.values_mut() {
            self.seal_locked(st);
        }
        ap.streams.clear();
    }

    /// Seals one stream's active segment (e.g. before a sync uploads it).
    pub fn seal_stream(&self, stream: u64) {
        let mut ap = self.append.lock();
        if let Some(mut st) = ap.streams.remove(&stream) {
            self.seal_locked(&mut st);
        }
    }

    fn reserve(&self, stream: u64, nblocks: u32) -> Result<Vec<(Arc<Segment>, u32, u32)>> {
        let seg_blocks = self.segment_blocks();
        let mut ap = self.append.lock();
        let AppendState { streams, next_id } = &mut *ap;
        let st = streams.entry(stream).or_default();
        let mut runs = Vec::new();
        let mut remaining = nblocks;
        while remaining > 0 {
            if st.active.is_none() || st.next_block >= seg_blocks {
                self.seal_locked(st);
                let id = *next_id;
                if id & SEGMENT_COUNTER_MASK == SEGMENT_COUNTER_MASK {
                    return Err(Error::Invalid(
                        "segment ids of this data directory are exhausted".into(),
                    ));
                }
                *next_id += 1;
                let (seg, direct, recycled) = match self.take_pooled(id, stream) {
                    Some((seg, direct)) => (seg, direct, true),
                    None => {
                        let (seg, direct) = Segment::create(
                            &self.dir,
                            id,
                            stream,
                            self.direct.load(Ordering::Relaxed),
                        )?;
                        (seg, direct, false)
                    }
                };
                if !direct && self.direct.swap(false, Ordering::Relaxed) {
                    tracing::warn!(dir = %self.dir.display(), "O_DIRECT not supported here; using buffered I/O");
                }
                let seg = Arc::new(seg);
                self.segments.write().insert(id, seg.clone());
                self.stats.segments_created.fetch_add(1, Ordering::Relaxed);
                if recycled {
                    self.stats.segments_recycled.fetch_add(1, Ordering::Relaxed);
                }
                st.active = Some(seg);
                st.next_block = 0;
                st.prealloc_block = 0;
                st.recycled = recycled;
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
                if st.recycled {
                    // Before any block past the old record is written (and so before the
                    // map can refer to one): recovery takes the record for the data end.
                    seg.set_fill(to).map_err(|e| {
                        Error::io(format!("recording the fill of {}", seg.path.display()), e)
                    })?;
                    st.prealloc_block = to;
                } else {
                    match seg.preallocate(st.prealloc_block as u64 * bs, to as u64 * bs) {
                        Ok(()) => st.prealloc_block = to,
                        // Out of space for the preallocation: what is kept for reuse goes,
                        // and the write itself may still fit (it extends the file, or
                        // fails with ENOSPC).
                        Err(Error::NoSpace) => self.free_reserves(),
                        Err(e) => return Err(e),
                    }
                }
            }
            seg.pending.fetch_add(1, Ordering::AcqRel);
            runs.push((seg.clone(), st.next_block, take));
            st.next_block += take;
            seg.used_blocks.store(st.next_block, Ordering::Release);
            remaining -= take;
        }
        Ok(runs)
    }

    /// Appends the 4 KiB blocks in `buf`'s window (its start and length multiples of 4 KiB).
    pub async fn append(&self, stream: u64, buf: Arc<AlignedBuf>) -> Result<Appended> {
        let n = buf.len() / BLOCK_SIZE;
        let all = std::iter::once(0..n).collect::<Vec<_>>();
        self.append_ranges(stream, buf, &all).await
    }

    /// Appends the given ranges of blocks of `buf`'s window (block indexes relative to the
    /// window start), in order, as one append.
    pub async fn append_ranges(
        &self,
        stream: u64,
        buf: Arc<AlignedBuf>,
        ranges: &[std::ops::Range<usize>],
    ) -> Result<Appended> {
        let mut v = self
            .append_many(stream, vec![(buf, ranges.to_vec())])
            .await?;
        v.pop()
            .ok_or_else(|| Error::Invalid("append produced no result".into()))
    }

    /// Appends several requests' blocks at once: one reservation and one vectored write
    /// per segment run for all of them (concurrent small writes cost one filesystem write
    /// instead of one each). Results are in the order of `items`.
    pub async fn append_many(
        &self,
        stream: u64,
        items: Vec<(Arc<AlignedBuf>, Vec<std::ops::Range<usize>>)>,
    ) -> Result<Vec<Appended>> {
        // Validate and checksum every item first.
        let mut crcs_all: Vec<Vec<u32>> = Vec::with_capacity(items.len());
        let mut total = 0usize;
        for (buf, ranges) in &items {
            let start = buf.window_start();
            let len = buf.len();
            if start % ALIGN != 0 || len % BLOCK_SIZE != 0 {
                return Err(Error::Invalid(format!(
                    "append of {len} bytes at buffer offset {start}: must be whole 4 KiB blocks"
                )));
            }
            let window_blocks = len / BLOCK_SIZE;
            if ranges.is_empty()
                || ranges
                    .iter()
                    .any(|r| r.start >= r.end || r.end > window_blocks)
            {
                return Err(Error::Invalid(format!(
                    "append ranges {ranges:?} outside a {window_blocks}-block buffer"
                )));
            }
            let mut crcs = Vec::new();
            for r in ranges {
                let bytes = &buf.as_slice()[r.start * BLOCK_SIZE..r.end * BLOCK_SIZE];
                crcs.extend(bytes.chunks(BLOCK_SIZE).map(block_crc));
            }
            total += crcs.len();
            crcs_all.push(crcs);
        }
        if total == 0 {
            return Err(Error::Invalid("empty append".into()));
        }
        self.wait_dirty_budget().await;
        let runs = self.reserve(stream, total as u32)?;
        self.dirty_bytes
            .fetch_add((total * BLOCK_SIZE) as u64, Ordering::AcqRel);
        // Lay the items' blocks out over the reserved runs, in order.
        let bufs: Vec<Arc<AlignedBuf>> = items.iter().map(|(b, _)| b.clone()).collect();
        // Pieces of each run: (buffer index, byte offset in the allocation, length).
        let mut run_pieces: Vec<Vec<(usize, usize, usize)>> = vec![Vec::new(); runs.len()];
        let mut item_runs: Vec<Vec<(BlockAddr, u32)>> = vec![Vec::new(); items.len()];
        let mut item_segments: Vec<Vec<Arc<Segment>>> = vec![Vec::new(); items.len()];
        let (mut run_idx, mut run_used) = (0usize, 0u32);
        for (idx, (buf, ranges)) in items.iter().enumerate() {
            for r in ranges {
                let mut src = r.clone();
                while !src.is_empty() {
                    let (seg, first, n) = &runs[run_idx];
                    let take = (src.len() as u32).min(n - run_used);
                    let addr = BlockAddr {
                        segment: seg.id,
                        block: first + run_used,
                    };
                    let byte_off = buf.window_start() + src.start * BLOCK_SIZE;
                    let bytes = take as usize * BLOCK_SIZE;
                    match run_pieces[run_idx].last_mut() {
                        Some(p) if p.0 == idx && p.1 + p.2 == byte_off => p.2 += bytes,
                        _ => run_pieces[run_idx].push((idx, byte_off, bytes)),
                    }
                    match item_runs[idx].last_mut() {
                        Some((a, m)) if a.segment == addr.segment && a.block + *m == addr.block => {
                            *m += take
                        }
                        _ => item_runs[idx].push((addr, take)),
                    }
                    if !item_segments[idx].iter().any(|s| s.id == seg.id) {
                        seg.pending.fetch_add(1, Ordering::AcqRel);
                        item_segments[idx].push(seg.clone());
                    }
                    src.start += take as usize;
                    run_used += take;
                    if run_used == *n {
                        run_idx += 1;
                        run_used = 0;
                    }
                }
            }
        }
        // Each item now holds its own pending references; drop the reservation's.
        let _reservation = PendingGuard {
            store_idle: self.idle.clone(),
            segments: runs.iter().map(|(s, _, _)| s.clone()).collect(),
        };
        let guards: Vec<PendingGuard> = item_segments
            .into_iter()
            .map(|segments| PendingGuard {
                store_idle: self.idle.clone(),
                segments,
            })
            .collect();
        let mut first_err = None;
        for ((seg, first, _), pieces) in runs.iter().zip(&run_pieces) {
            let mut pos = *first as u64 * BLOCK_SIZE as u64;
            for chunk in pieces.chunks(1024) {
                let r = self.io().writev_at(&seg.file, pos, &bufs, chunk).await;
                if let Err(e) = r {
                    first_err.get_or_insert(Error::io(seg.path.display().to_string(), e));
                }
                pos += chunk.iter().map(|p| p.2 as u64).sum::<u64>();
            }
            self.dirty.lock().insert(seg.id);
        }
        drop(_reservation);
        if let Some(e) = first_err {
            return Err(e);
        }
        fail::fail_point!("chunkstore::append::after_write", |_| Err(Error::Injected(
            "chunkstore::append::after_write"
        )));
        self.stats
            .appended_bytes
            .fetch_add((total * BLOCK_SIZE) as u64, Ordering::Relaxed);
        Ok(item_runs
            .into_iter()
            .zip(crcs_all)
            .zip(guards)
            .map(|((runs, crcs), guard)| Appended {
                runs,
                crcs,
                _guard: guard,
            })
            .collect())
    }

    /// Reads blocks into `out` (block `i` of `out` at byte `i * 4096` of its allocation)
    /// and verifies each block read against `expected[out_block]`.
    pub async fn read_verified(
        &self,
        reqs: &[ReadReq],
        expected: &[u32],
        out: AlignedBuf,
    ) -> (AlignedBuf, Result<()>) {
        let (out, res) = self.read_verified_once(reqs, expected, out).await;
        // A block fetched from the object store that fails its checksum may have been
        // damaged in transit: drop the cached frames and fetch once more.
        if let Err(Error::Checksum { addr, .. }) = &res
            && let Some(tier) = self.tier.get()
            && let Some(seg) = self.segment(addr.segment)
            && tier.invalidate(&seg, addr.block, 1)
        {
            return self.read_verified_once(reqs, expected, out).await;
        }
        (out, res)
    }

    async fn read_verified_once(
        &self,
        reqs: &[ReadReq],
        expected: &[u32],
        out: AlignedBuf,
    ) -> (AlignedBuf, Result<()>) {
        let out = Arc::new(out);
        let res = self.read_into(reqs, &out).await;
        let mut out = match Arc::try_unwrap(out) {
            Ok(b) => b,
            // Unreachable: every operation returned its reference on completion. Copy
            // rather than panic should that ever change.
            Err(shared) => {
                let mut b = AlignedBuf::zeroed(shared.capacity());
                b.set_window(0, shared.capacity());
                b
            }
        };
        match res {
            Ok(gaps) => gaps.fill(&mut out),
            Err(e) => return (out, Err(e)),
        }
        let res = self.verify(reqs, expected, &out);
        (out, res)
    }

    /// Reads every request into `out`; what reading through gaps left to do comes back.
    async fn read_into(&self, reqs: &[ReadReq], out: &Arc<AlignedBuf>) -> Result<Gaps> {
        let mut segs = Vec::with_capacity(reqs.len());
        for r in reqs {
            let seg = match self.segment(r.addr.segment) {
                Some(s) => s,
                None => self.remote_segment(r.addr.segment)?,
            };
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
            segs.push(seg);
        }
        let _pins: Vec<ReadPin<'_>> = segs.iter().map(|s| ReadPin::new(s)).collect();
        if let Some(tier) = self.tier.get() {
            let fetches = reqs
                .iter()
                .zip(&segs)
                .map(|(r, seg)| tier.ensure_resident(self, seg, r.addr.block, r.blocks));
            for r in futures::future::join_all(fetches).await {
                r?;
            }
        }
        let plan = ReadPlan::new(reqs, COALESCE_GAP_BLOCKS);
        let scratch = (plan.scratch_blocks > 0)
            .then(|| Arc::new(AlignedBuf::for_overwrite(plan.scratch_blocks * BLOCK_SIZE)));
        let io = self.io();
        let reads = plan.pieces.iter().map(|p| {
            let seg = &segs[p.req];
            let dest = match (&scratch, p.into_scratch) {
                (Some(s), true) => s,
                _ => out,
            };
            let io = &io;
            async move {
                io.read_at(
                    &seg.file,
                    p.block as u64 * BLOCK_SIZE as u64,
                    dest,
                    p.at * BLOCK_SIZE,
                    p.blocks as usize * BLOCK_SIZE,
                )
                .await
                .map_err(|e| Error::io(seg.path.display().to_string(), e))
            }
        });
        let results = {
            let mut all = std::pin::pin!(futures::future::join_all(reads));
            // Every read of the request is submitted in one system call (see `Uring::plug`).
            let first = std::future::poll_fn(|cx| {
                let _plug = Uring::plug();
                std::task::Poll::Ready(all.as_mut().poll(cx))
            })
            .await;
            match first {
                std::task::Poll::Ready(r) => r,
                std::task::Poll::Pending => all.await,
            }
        };
        for r in results {
            r?;
        }
        let total: u64 = plan
            .pieces
            .iter()
            .map(|p| p.blocks as u64 * BLOCK_SIZE as u64)
            .sum();
        self.stats.read_bytes.fetch_add(total, Ordering::Relaxed);
        Ok(Gaps { plan, scratch })
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
        let io = self.io();
        // A file whose fill record changed takes a full fsync (fdatasync may leave an
        // extended attribute in the journal's running transaction).
        let full: Vec<bool> = segs
            .iter()
            .map(|s| s.fill_dirty.swap(false, Ordering::AcqRel))
            .collect();
        let futs = segs
            .iter()
            .zip(&full)
            .map(|(s, full)| io.sync(&s.file, !full));
        let results = futures::future::join_all(futs).await;
        for (s, r) in segs.iter().zip(results) {
            if let Err(e) = r {
                // Keep them dirty: the next sync retries.
                for (s, full) in segs.iter().zip(&full) {
                    if *full {
                        s.fill_dirty.store(true, Ordering::Release);
                    }
                }
                self.dirty.lock().extend(ids.iter().copied());
                return Err(Error::io(format!("fdatasync {}", s.path.display()), e));
            }
        }
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Takes note that nothing references these blocks any more and releases their disk
    /// space: whole 64 KiB granules are punched out as soon as all their blocks are
    /// released (punching single 4 KiB blocks costs a filesystem transaction each, which
    /// random overwrites would turn into a steady background load). Blocks of partly
    /// released granules keep their space until their segment is deleted. The record of
    /// released blocks is in memory: after a restart, those not yet punched wait for their
    /// segment's deletion.
    pub async fn release(&self, addrs: Vec<BlockAddr>) -> Result<()> {
        let seg_blocks = self.segment_blocks();
        let mut granules: Vec<(u64, u32)> = Vec::new();
        {
            let live = self.segments.read();
            let mut dead = self.dead.lock();
            for a in addrs {
                if a.block >= seg_blocks || !live.contains_key(&a.segment) {
                    continue; // past the end, or its segment is gone already
                }
                let m = dead
                    .entry(a.segment)
                    .or_insert_with(|| DeadMap::new(seg_blocks));
                if m.set(a.block) {
                    let g = a.block / GRANULE_BLOCKS;
                    if m.granule_full(g) {
                        granules.push((a.segment, g));
                    }
                }
            }
        }
        granules.sort_unstable();
        granules.dedup();
        let mut runs: Vec<GranuleRun> = Vec::new();
        for (segment, g) in granules {
            match runs.last_mut() {
                Some(r) if r.segment == segment && r.first + r.count == g => r.count += 1,
                _ => runs.push(GranuleRun {
                    segment,
                    first: g,
                    count: 1,
                }),
            }
        }
        if self.cfg.recycle_segments > 0 && !self.cfg.punch_delay.is_zero() {
            let now = std::time::Instant::now();
            {
                let mut d = self.deferred.lock();
                for run in runs {
                    d.push(now, run);
                }
            }
            return self.punch_deferred().await;
        }
        self.punch_runs(runs).await
    }

    /// Punches the released space that waited its [`LocalConfig::punch_delay`] (or beyond
    /// [`DEFER_LIMIT`]); space of segments removed meanwhile needs no punch.
    pub async fn punch_deferred(&self) -> Result<()> {
        let due = self
            .deferred
            .lock()
            .take_due(std::time::Instant::now(), self.cfg.punch_delay);
        self.punch_runs(due).await
    }

    /// Bytes of released space waiting for their punch.
    pub fn deferred_bytes(&self) -> u64 {
        self.deferred.lock().bytes
    }

    /// Punches runs of whole granules.
    async fn punch_runs(&self, runs: Vec<GranuleRun>) -> Result<()> {
        for run in runs {
            let Some(seg) = self.segments.read().get(&run.segment).cloned() else {
                continue; // already deleted
            };
            fail::fail_point!("chunkstore::punch", |_| Err(Error::Injected(
                "chunkstore::punch"
            )));
            self.io()
                .fallocate(
                    &seg.file,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    run.offset(),
                    run.len(),
                )
                .await
                .map_err(|e| Error::io(format!("punch {}", seg.path.display()), e))?;
            self.stats
                .punched_bytes
                .fetch_add(run.len(), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Releases a whole chunk nothing references any more: its 1 MiB is punched out.
    pub async fn release_chunk(&self, c: ChunkId) -> Result<()> {
        let seg_blocks = self.segment_blocks();
        let addrs: Vec<BlockAddr> = (0..CHUNK_BLOCKS)
            .map(|i| c.block(i))
            .filter(|a| a.block < seg_blocks)
            .collect();
        self.release(addrs).await
    }

    /// Chunks per segment.
    pub fn chunks_per_segment(&self) -> u32 {
        self.segment_blocks().div_ceil(CHUNK_BLOCKS)
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
            seg.removed.store(true, Ordering::SeqCst);
            self.dirty.lock().remove(&id);
            self.dead.lock().remove(&id);
            // Its waiting punches would only be skipped: they stop counting against the
            // limit now.
            self.deferred.lock().forget(id);
            if let Some(tier) = self.tier.get() {
                tier.meta().remove_seg(id)?;
            }
            if !self.recycle(&seg) {
                match std::fs::remove_file(&seg.path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(seg.path.display().to_string(), e)),
                }
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
            let end = s.written_end().div_ceil(BLOCK_SIZE as u64) * BLOCK_SIZE as u64;
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

    /// Bytes the segment files of one stream occupy on disk.
    /// Bytes the segment files of each append stream occupy on disk (one pass over the
    /// segments, however many volumes ask).
    pub fn allocated_bytes_by_stream(&self) -> std::collections::HashMap<u64, u64> {
        let mut out = std::collections::HashMap::new();
        for s in self.segments() {
            *out.entry(s.stream).or_insert(0) += s.allocated_bytes();
        }
        out
    }

    /// Bytes the segment files and the free pool occupy on disk.
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let segs: Vec<Arc<Segment>> = self.segments.read().values().cloned().collect();
        let pool: Vec<PathBuf> = self.pool.lock().clone();
        let free: u64 = pool
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.blocks() * 512)
            .sum();
        segs.iter().map(|s| s.allocated_bytes()).sum::<u64>() + free
    }

    pub fn direct_io(&self) -> bool {
        self.direct.load(Ordering::Relaxed)
    }
}

/// Largest run of unwanted blocks a read goes through rather than split in two: reading
/// 32 KiB more costs the disk less than another request, and a sequential read of data that
/// random overwrites moved block by block elsewhere stays one request per original run.
const COALESCE_GAP_BLOCKS: u32 = 8;

/// One I/O of a read: `blocks` blocks at `block` of `reqs[req]`'s segment, into block `at`
/// of the output (or of the scratch buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    req: usize,
    block: u32,
    blocks: u32,
    at: usize,
    into_scratch: bool,
}

/// How a set of [`ReadReq`]s becomes I/O. Requests that continue one another in a segment
/// (same distance between segment block and output block) with at most `max_gap` blocks
/// between them are read as one piece straight into the output; the requests whose output
/// blocks lie in such a gap are read into a scratch buffer and copied over the gap once
/// every piece is in, and gap blocks no request names are zeroed. Without gaps, each
/// request is one piece.
#[derive(Debug, Default)]
struct ReadPlan {
    pieces: Vec<Piece>,
    /// (scratch block, output block, blocks) to copy after the I/O.
    copies: Vec<(usize, usize, usize)>,
    /// Output block ranges to zero after the I/O (gap blocks nobody asked for).
    zeros: Vec<(usize, usize)>,
    scratch_blocks: usize,
}

impl ReadPlan {
    fn new(reqs: &[ReadReq], max_gap: u32) -> ReadPlan {
        let mut plan = ReadPlan::default();
        let sorted = reqs
            .windows(2)
            .all(|w| w[0].out_block + w[0].blocks as usize <= w[1].out_block);
        if max_gap == 0 || !sorted {
            plan.pieces = reqs
                .iter()
                .enumerate()
                .map(|(i, r)| Piece {
                    req: i,
                    block: r.addr.block,
                    blocks: r.blocks,
                    at: r.out_block,
                    into_scratch: false,
                })
                .collect();
            return plan;
        }
        let key = |r: &ReadReq| (r.addr.segment, r.addr.block as i64 - r.out_block as i64);
        let mut queue: std::collections::VecDeque<usize> = (0..reqs.len()).collect();
        while let Some(first) = queue.pop_front() {
            let f = &reqs[first];
            let start = f.out_block;
            let mut end = start + f.blocks as usize;
            let mut members = vec![first];
            let mut fillers: Vec<usize> = Vec::new();
            let mut pending: Vec<usize> = Vec::new();
            while let Some(&j) = queue.front() {
                let r = &reqs[j];
                if r.out_block > end + max_gap as usize {
                    break;
                }
                queue.pop_front();
                let gap = r.out_block - end;
                if key(r) == key(f) && gap <= max_gap as usize {
                    fillers.append(&mut pending);
                    members.push(j);
                    end = r.out_block + r.blocks as usize;
                } else {
                    pending.push(j);
                }
            }
            // Requests past the last member start the next pieces.
            for j in pending.into_iter().rev() {
                queue.push_front(j);
            }
            plan.pieces.push(Piece {
                req: first,
                block: f.addr.block,
                blocks: (end - start) as u32,
                at: start,
                into_scratch: false,
            });
            // The gaps between members: fillers' blocks are copied in, the rest zeroed.
            let mut covered: Vec<(usize, usize)> = Vec::new();
            for &j in &fillers {
                let r = &reqs[j];
                plan.pieces.push(Piece {
                    req: j,
                    block: r.addr.block,
                    blocks: r.blocks,
                    at: plan.scratch_blocks,
                    into_scratch: true,
                });
                plan.copies
                    .push((plan.scratch_blocks, r.out_block, r.blocks as usize));
                plan.scratch_blocks += r.blocks as usize;
            }
            covered.extend(members.iter().chain(&fillers).map(|&j| {
                let r = &reqs[j];
                (r.out_block, r.out_block + r.blocks as usize)
            }));
            covered.sort_unstable();
            let mut pos = start;
            for (a, b) in covered {
                if a > pos {
                    plan.zeros.push((pos, a));
                }
                pos = pos.max(b);
            }
        }
        plan
    }
}

/// What a read through gaps leaves to do once its I/O is in (see [`ReadPlan`]).
struct Gaps {
    plan: ReadPlan,
    scratch: Option<Arc<AlignedBuf>>,
}

impl Gaps {
    /// Copies the fillers over the gaps and zeroes the rest.
    fn fill(&self, out: &mut AlignedBuf) {
        if let Some(scratch) = &self.scratch {
            let mut view = AlignedView(scratch);
            for &(from, to, n) in &self.plan.copies {
                for i in 0..n {
                    out.copy_in((to + i) * BLOCK_SIZE, view.block(from + i));
                }
            }
        }
        for &(a, b) in &self.plan.zeros {
            out.zero_range(a * BLOCK_SIZE, (b - a) * BLOCK_SIZE);
        }
    }
}

/// Keeps eviction (and recycling) off a segment for the life of a read or an upload (see
/// `Segment::readers`).
pub(crate) struct ReadPin<'a>(&'a Segment);

impl<'a> ReadPin<'a> {
    pub(crate) fn new(seg: &'a Segment) -> ReadPin<'a> {
        seg.readers.fetch_add(1, Ordering::SeqCst);
        ReadPin(seg)
    }
}

impl Drop for ReadPin<'_> {
    fn drop(&mut self) {
        self.0.readers.fetch_sub(1, Ordering::SeqCst);
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

/// Punches a range now; false (logged) when the filesystem refused.
fn punch_sync(seg: &Segment, offset: u64, len: u64) -> bool {
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
    r == 0
}

#[cfg(test)]
mod plan_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    /// What block `b` of segment `s` holds in this simulation.
    fn stored(s: u64, b: u32) -> u64 {
        (s << 32) | u64::from(b) | 1 << 63
    }

    /// Runs a plan against simulated segments (pieces land in any order) and returns the
    /// output blocks.
    fn execute(reqs: &[ReadReq], plan: &ReadPlan, n: usize, reverse: bool) -> Vec<u64> {
        let mut out = vec![u64::MAX; n];
        let mut scratch = vec![u64::MAX; plan.scratch_blocks];
        let mut pieces = plan.pieces.clone();
        if reverse {
            pieces.reverse();
        }
        for p in pieces {
            let seg = reqs[p.req].addr.segment;
            let dest = if p.into_scratch {
                &mut scratch
            } else {
                &mut out
            };
            for i in 0..p.blocks as usize {
                dest[p.at + i] = stored(seg, p.block + i as u32);
            }
        }
        for &(from, to, k) in &plan.copies {
            out[to..to + k].copy_from_slice(&scratch[from..from + k]);
        }
        for &(a, b) in &plan.zeros {
            out[a..b].fill(0);
        }
        out
    }

    /// Requests as a volume builds them: output blocks in order, each either unmapped or
    /// from one of a few segments, near where a sequential layout would put it or anywhere.
    fn layout() -> impl Strategy<Value = (Vec<ReadReq>, usize)> {
        prop::collection::vec((0u8..8, 0u64..3, 0u32..600), 1..200).prop_map(|blocks| {
            let n = blocks.len();
            let mut reqs: Vec<ReadReq> = Vec::new();
            for (i, (kind, seg, far)) in blocks.into_iter().enumerate() {
                let addr = match kind {
                    0 => continue, // unmapped
                    1 | 2 => BlockAddr {
                        segment: seg + 1,
                        block: far,
                    },
                    _ => BlockAddr {
                        segment: 0,
                        block: 100 + i as u32,
                    },
                };
                ReadReq::push_block(&mut reqs, addr, i);
            }
            (reqs, n)
        })
    }

    proptest! {
        #[test]
        fn coalesced_reads_deliver_every_requested_block(
            (reqs, n) in layout(), gap in 0u32..12, reverse: bool,
        ) {
            let plan = ReadPlan::new(&reqs, gap);
            prop_assert!(plan.pieces.len() <= reqs.len());
            let out = execute(&reqs, &plan, n, reverse);
            let mut named = vec![false; n];
            for r in &reqs {
                for i in 0..r.blocks as usize {
                    named[r.out_block + i] = true;
                    prop_assert_eq!(out[r.out_block + i], stored(r.addr.segment, r.addr.block + i as u32));
                }
            }
            // Blocks no request names are untouched or zero, never another block's data.
            for (i, o) in out.iter().enumerate() {
                if !named[i] {
                    prop_assert!(*o == u64::MAX || *o == 0, "block {} holds {:x}", i, o);
                }
            }
            // No piece reads past what a request bounds (gaps stay within max_gap).
            for p in &plan.pieces {
                if !p.into_scratch {
                    let first = &reqs[p.req];
                    prop_assert_eq!(p.block, first.addr.block);
                }
            }
        }
    }

    #[test]
    fn a_sequential_run_with_moved_blocks_is_one_read_plus_the_moved_ones() {
        // Blocks 0..16 at segment 0 blocks 100.., except 3 and 9, moved to segment 7.
        let mut reqs = Vec::new();
        let runs = [(0, 3), (4, 5), (10, 6)];
        for (at, len) in runs {
            reqs.push(ReadReq {
                addr: BlockAddr {
                    segment: 0,
                    block: 100 + at as u32,
                },
                blocks: len,
                out_block: at,
            });
        }
        reqs.insert(
            1,
            ReadReq {
                addr: BlockAddr {
                    segment: 7,
                    block: 40,
                },
                blocks: 1,
                out_block: 3,
            },
        );
        reqs.insert(
            3,
            ReadReq {
                addr: BlockAddr {
                    segment: 7,
                    block: 12,
                },
                blocks: 1,
                out_block: 9,
            },
        );
        let plan = ReadPlan::new(&reqs, 8);
        let direct: Vec<_> = plan.pieces.iter().filter(|p| !p.into_scratch).collect();
        assert_eq!(direct.len(), 1, "{plan:?}");
        assert_eq!(
            (direct[0].block, direct[0].blocks, direct[0].at),
            (100, 16, 0)
        );
        assert_eq!(plan.scratch_blocks, 2);
        assert!(plan.zeros.is_empty());
        let out = execute(&reqs, &plan, 16, true);
        assert_eq!(out[3], stored(7, 40));
        assert_eq!(out[9], stored(7, 12));
        assert_eq!(out[15], stored(0, 115));
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
        read_runs(store, &a.runs, &a.crcs).await
    }

    /// Reads runs `(address, blocks)` back in order, verified against `crcs`.
    async fn read_runs(
        store: &LocalStore,
        runs: &[(BlockAddr, u32)],
        crcs: &[u32],
    ) -> Result<AlignedBuf> {
        let mut reqs = Vec::new();
        let mut out_block = 0;
        for (addr, n) in runs {
            reqs.push(ReadReq {
                addr: *addr,
                blocks: *n,
                out_block,
            });
            out_block += *n as usize;
        }
        let out = AlignedBuf::zeroed(out_block * BLOCK_SIZE);
        let (out, r) = store.read_verified(&reqs, crcs, out).await;
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
            let a = store.append(1, Arc::new(data)).await.unwrap();
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
        let a = store.append(1, Arc::new(pattern(2, 9))).await.unwrap();
        let (addr, _) = a.runs[0];
        // Flip one byte of the second block behind the store's back.
        let path = dir.path().join(segment::file_name(addr.segment, 1));
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
        let a = store.append(1, Arc::new(pattern(64, 1))).await.unwrap();
        store.sync().await.unwrap();
        let before = store.allocated_bytes();
        assert!(before >= 64 * 4096, "allocated {before}");
        // Releasing 40 blocks punches the two fully released 64 KiB granules only.
        let addrs: Vec<BlockAddr> = a.addrs().take(40).collect();
        store.release(addrs).await.unwrap();
        let after = store.allocated_bytes();
        assert_eq!(before - after, 32 * 4096, "before {before} after {after}");
        assert_eq!(store.stats.punched_bytes.load(Ordering::Relaxed), 32 * 4096);
        // Releasing the rest of the third granule punches it too; repeats are harmless.
        let addrs: Vec<BlockAddr> = a.addrs().skip(32).take(16).collect();
        store.release(addrs.clone()).await.unwrap();
        store.release(addrs).await.unwrap();
        assert_eq!(before - store.allocated_bytes(), 48 * 4096);
        // The segment is full but still active until the next append seals it.
        let seg = a.runs[0].0.segment;
        drop(a);
        store.seal_active();
        assert!(store.is_idle(seg));
        assert!(store.take_idle().contains(&seg));
        assert!(store.remove_segment(seg).unwrap());
        assert_eq!(store.allocated_bytes(), 0);
        assert!(!dir.path().join(segment::file_name(seg, 1)).exists());
    }

    fn recycling(segment_bytes: u64, punch_delay: std::time::Duration) -> LocalConfig {
        LocalConfig {
            segment_bytes,
            recycle_segments: 2,
            punch_delay,
            ..Default::default()
        }
    }

    fn inode(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().ino()
    }

    /// An emptied segment's file becomes the next new segment (same inode, no new file);
    /// its released space waits instead of being punched; after a crash, recovery takes
    /// the fill record, not the (fully written) file, for the end of the new data.
    #[tokio::test]
    async fn emptied_segments_are_recycled_and_recover() {
        let seg_blocks = 4096; // 16 MiB: larger than one fill step (PREALLOC_BLOCKS)
        let dir = tempfile::tempdir().unwrap();
        let (seg2, b_runs, b_crcs) = {
            let cfg = recycling(seg_blocks as u64 * 4096, std::time::Duration::from_secs(60));
            let store = LocalStore::open(dir.path(), cfg).unwrap();
            let a = store
                .append(1, Arc::new(pattern(seg_blocks, 1)))
                .await
                .unwrap();
            let seg = a.runs[0].0.segment;
            let ino = inode(&dir.path().join(segment::file_name(seg, 1)));
            store.release(a.addrs().collect()).await.unwrap();
            assert_eq!(store.stats.punched_bytes.load(Ordering::Relaxed), 0);
            assert_eq!(store.deferred_bytes(), seg_blocks as u64 * 4096);
            drop(a);
            store.seal_active();
            assert!(store.take_idle().contains(&seg));
            assert!(store.remove_segment(seg).unwrap());
            assert_eq!(store.free_segments(), 1);
            assert_eq!(
                store.deferred_bytes(),
                0,
                "a removed segment's punches are dropped"
            );
            assert!(!dir.path().join(segment::file_name(seg, 1)).exists());
            // The kept file still occupies the disk, and the daemon's total says so.
            assert_eq!(store.allocated_bytes(), seg_blocks as u64 * 4096);

            let data = pattern(3, 7);
            let b = store.append(2, Arc::new(pattern(3, 7))).await.unwrap();
            let seg2 = b.runs[0].0.segment;
            assert_ne!(seg2, seg);
            assert_eq!(inode(&dir.path().join(segment::file_name(seg2, 2))), ino);
            assert_eq!(store.free_segments(), 0);
            assert_eq!(store.stats.segments_recycled.load(Ordering::Relaxed), 1);
            let out = read_back(&store, &b).await.unwrap();
            assert_eq!(out.as_slice(), data.as_slice());
            // The fill record changed: this sync is a full fsync, which clears the mark.
            let s2 = store.segment(seg2).unwrap();
            assert!(s2.fill_dirty.load(Ordering::Acquire));
            store.sync().await.unwrap();
            assert!(!s2.fill_dirty.load(Ordering::Acquire));
            // Dropped without sealing: a crash of the appending process.
            (seg2, b.runs.clone(), b.crcs.clone())
        };
        let store = LocalStore::open(
            dir.path(),
            recycling(seg_blocks as u64 * 4096, Default::default()),
        )
        .unwrap();
        let s = store.segment(seg2).unwrap();
        assert_eq!(
            s.used_blocks.load(Ordering::Acquire),
            PREALLOC_BLOCKS,
            "the fill record, not the old blocks past it"
        );
        store.trim_tails();
        assert!(store.allocated_bytes() <= PREALLOC_BLOCKS as u64 * 4096);
        let out = read_runs(&store, &b_runs, &b_crcs).await.unwrap();
        assert_eq!(out.as_slice(), pattern(3, 7).as_slice());
    }

    /// A full disk gives back what waits: the pool's files go and waiting punches run
    /// (and count as punched).
    #[tokio::test]
    async fn full_disk_frees_the_reserves() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = recycling(64 * 4096, std::time::Duration::from_secs(60));
        let store = LocalStore::open(dir.path(), cfg).unwrap();
        let a = store.append(1, Arc::new(pattern(64, 1))).await.unwrap();
        store.seal_active();
        store.take_idle();
        drop(a);
        assert!(store.remove_segment(store.segment_ids()[0]).unwrap());
        let b = store.append(1, Arc::new(pattern(64, 2))).await.unwrap();
        let c = store.append(2, Arc::new(pattern(64, 3))).await.unwrap();
        store.seal_active();
        store.take_idle();
        drop(c);
        let cseg = store.segment_ids().into_iter().max().unwrap();
        assert!(store.remove_segment(cseg).unwrap());
        assert_eq!(store.free_segments(), 1);
        store.release(b.addrs().take(32).collect()).await.unwrap();
        assert_eq!(store.deferred_bytes(), 32 * 4096);
        store.free_reserves();
        assert_eq!(store.free_segments(), 0);
        assert_eq!(store.deferred_bytes(), 0);
        assert_eq!(store.stats.punched_bytes.load(Ordering::Relaxed), 32 * 4096);
        assert_eq!(store.allocated_bytes(), 32 * 4096);
    }

    /// Released space is punched once it waited the delay; the pool keeps at most
    /// `recycle_segments` files (also when reopened with a smaller setting); a partly
    /// used recycled segment gives its tail back when sealed.
    #[tokio::test]
    async fn deferred_punches_and_pool_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let delay = std::time::Duration::from_millis(50);
        let store = LocalStore::open(dir.path(), recycling(64 * 4096, delay)).unwrap();
        let a = store.append(1, Arc::new(pattern(64, 1))).await.unwrap();
        store.release(a.addrs().take(32).collect()).await.unwrap();
        assert_eq!(store.stats.punched_bytes.load(Ordering::Relaxed), 0);
        tokio::time::sleep(delay * 2).await;
        store.punch_deferred().await.unwrap();
        assert_eq!(store.stats.punched_bytes.load(Ordering::Relaxed), 32 * 4096);
        assert_eq!(store.deferred_bytes(), 0);
        drop(a);
        // Three emptied segments: two are kept, the third is deleted.
        for i in 0..3 {
            store.append(1, Arc::new(pattern(64, i))).await.unwrap();
        }
        store.seal_active();
        store.take_idle();
        for s in &store.segment_ids() {
            assert!(store.remove_segment(*s).unwrap());
        }
        assert_eq!(store.free_segments(), 2);
        let free = |d: &Path| {
            std::fs::read_dir(d)
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_str()
                        .unwrap()
                        .ends_with(FREE_SUFFIX)
                })
                .count()
        };
        assert_eq!(free(dir.path()), 2);
        // A recycled segment sealed after 3 blocks punches the old blocks past them.
        let c = store.append(1, Arc::new(pattern(3, 9))).await.unwrap();
        let cseg = store.segment(c.runs[0].0.segment).unwrap();
        drop(c);
        store.seal_active();
        assert_eq!(cseg.fill(), Some(3));
        assert_eq!(cseg.allocated_bytes(), 3 * 4096);
        drop(store);
        let cfg = LocalConfig {
            recycle_segments: 0,
            ..recycling(64 * 4096, delay)
        };
        let store = LocalStore::open(dir.path(), cfg).unwrap();
        assert_eq!(store.free_segments(), 0);
        assert_eq!(free(dir.path()), 0);
        assert_eq!(
            store
                .segment(cseg.id)
                .unwrap()
                .used_blocks
                .load(Ordering::Acquire),
            3
        );
    }

    #[tokio::test]
    async fn pending_appends_block_removal() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), cfg(1 << 20)).unwrap();
        let a = store.append(1, Arc::new(pattern(1, 1))).await.unwrap();
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
            let a = store.append(1, Arc::new(data)).await.unwrap();
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
        let b = store.append(1, Arc::new(pattern(1, 5))).await.unwrap();
        assert_ne!(b.runs[0].0.segment, runs[0].0.segment);
    }

    #[tokio::test]
    async fn append_ranges_packs_the_chosen_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), cfg(4 * 4096)).unwrap();
        let data = pattern(8, 3);
        let src = data.as_slice().to_vec();
        let a = store
            .append_ranges(1, Arc::new(data), &[1..3, 4..8])
            .await
            .unwrap();
        assert_eq!(a.addrs().count(), 6);
        let back = read_back(&store, &a).await.unwrap();
        let mut expect = src[4096..3 * 4096].to_vec();
        expect.extend_from_slice(&src[4 * 4096..]);
        assert_eq!(back.as_slice(), &expect[..]);
    }

    #[tokio::test]
    async fn append_many_lays_out_items_in_order_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), cfg(8 * 4096)).unwrap();
        let items: Vec<(Arc<AlignedBuf>, Vec<std::ops::Range<usize>>)> = (0..5u8)
            .map(|i| (Arc::new(pattern(3, i)), vec![0..1, 2..3]))
            .collect();
        let expect: Vec<Vec<u8>> = items
            .iter()
            .map(|(b, _)| {
                let s = b.as_slice();
                [&s[..4096], &s[2 * 4096..]].concat()
            })
            .collect();
        let out = store.append_many(1, items).await.unwrap();
        assert_eq!(out.len(), 5);
        // 10 blocks over 8-block segments: at least one item straddles two segments.
        assert!(store.segment_ids().len() >= 2);
        for (a, e) in out.iter().zip(&expect) {
            assert_eq!(a.addrs().count(), 2);
            assert_eq!(read_back(&store, a).await.unwrap().as_slice(), &e[..]);
        }
    }

    #[tokio::test]
    async fn rejects_partial_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), cfg(1 << 20)).unwrap();
        let mut b = AlignedBuf::zeroed(4096);
        b.set_window(0, 512);
        assert!(matches!(
            store.append(1, Arc::new(b)).await,
            Err(Error::Invalid(_))
        ));
    }
}
