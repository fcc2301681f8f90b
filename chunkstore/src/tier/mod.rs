//! The object-store tier (see docs/object-tier.md): uploads sealed segments as
//! content-addressed, compressed chunk objects; fetches missing frames back into the segment
//! files on reads (which makes the segment files a cache); evicts clean data under a byte
//! budget; deletes objects nothing references any more.
//!
//! This module knows segments and chunks, not volumes: the caller (blockd) says which
//! chunks are still referenced, when a stream's manifest covers its uploads, and which
//! objects other hosts' manifests still need.

pub mod format;
pub mod meta;

use crate::buf::AlignedBuf;
use crate::crc::BLOCK_SIZE;
use crate::error::{Error, Result};
use crate::local::{CHUNK_BLOCKS, ChunkId, LocalStore};
use crate::segment::{FRAME_BLOCKS, Segment};
use format::ChunkLayout;
use meta::{Meta, SegRecord};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct TierConfig {
    /// Bytes of clean (uploaded and manifested) data kept on the local disk.
    pub cache_bytes: u64,
    /// Bytes of data not yet uploaded at which writes wait for the uploader.
    pub dirty_limit: u64,
    /// Chunk uploads in flight.
    pub upload_concurrency: usize,
    /// zstd level of chunk frames.
    pub zstd_level: i32,
    /// Frames fetched ahead of a sequential read pattern.
    pub readahead_frames: u32,
    /// Minimum age before an unreferenced object is deleted.
    pub gc_grace: Duration,
    /// Attempts per object request (transient errors are retried with backoff).
    pub attempts: u32,
}

impl Default for TierConfig {
    fn default() -> Self {
        TierConfig {
            cache_bytes: 8 << 30,
            dirty_limit: 1 << 30,
            upload_concurrency: 4,
            zstd_level: 1,
            readahead_frames: 16,
            gc_grace: Duration::from_secs(3600),
            attempts: 5,
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct TierStats {
    pub uploaded_chunks: AtomicU64,
    pub uploaded_bytes: AtomicU64,
    pub dedup_chunks: AtomicU64,
    pub fetches: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub evicted_bytes: AtomicU64,
    pub evictions: AtomicU64,
    pub deleted_objects: AtomicU64,
    pub checksum_refetches: AtomicU64,
    pub request_errors: AtomicU64,
    /// Unix ms of the oldest sealed segment waiting for upload (0 = none): upload lag.
    pub oldest_dirty_ms: AtomicU64,
    /// Clean (uploaded, manifested) bytes resident in the local cache after the last
    /// eviction round.
    pub cached_bytes: AtomicU64,
}

/// Which manifests in the bucket still reference an object whose deletion is due
/// ([`Tier::gc_round`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestRefs {
    /// None: the object can be deleted.
    None,
    /// A manifest of a volume another host holds: that host counts its own reference to the
    /// object and collects it when done; this host forgets the deletion.
    OtherHost,
    /// Only manifests of volumes this host holds, written before their last reference to
    /// the object went away: the deletion waits another grace period, for the next sync to
    /// replace them (deleting now would break opening the volume from its last manifest;
    /// forgetting the deletion would leak the object).
    ThisHost,
}

/// One frame being fetched: readers that need it wait for the fetcher's outcome.
#[derive(Default)]
struct FetchState {
    outcome: Mutex<Option<std::result::Result<(), String>>>,
    done: tokio::sync::Notify,
}

impl FetchState {
    fn finish(&self, r: std::result::Result<(), String>) {
        let mut o = self.outcome.lock();
        if o.is_none() {
            *o = Some(r);
        }
        drop(o);
        self.done.notify_waiters();
    }

    async fn wait(&self) -> std::result::Result<(), String> {
        loop {
            let notified = self.done.notified();
            if let Some(r) = self.outcome.lock().clone() {
                return r;
            }
            notified.await;
        }
    }
}

type FetchCell = Arc<FetchState>;

/// Settles the frames a fetcher claimed, also when its future is dropped midway (the
/// waiters then see an error and their reads fail rather than hang).
struct Claimed<'a> {
    tier: &'a Tier,
    seg: u64,
    frames: Vec<u32>,
    outcome: Option<std::result::Result<(), String>>,
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        let r = self
            .outcome
            .take()
            .unwrap_or_else(|| Err("the fetch was cancelled".into()));
        let mut inflight = self.tier.inflight.lock();
        for f in &self.frames {
            if let Some(c) = inflight.remove(&(self.seg, *f)) {
                c.finish(r.clone());
            }
        }
    }
}

pub struct Tier {
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    meta: Meta,
    cfg: TierConfig,
    inflight: Mutex<HashMap<(u64, u32), FetchCell>>,
    /// Per segment, the last frame fetched (sequential detection for readahead).
    last_fetch: Mutex<HashMap<u64, u32>>,
    pub stats: TierStats,
    /// Signalled when dirty bytes go down.
    pub(crate) drained: tokio::sync::Notify,
}

impl std::fmt::Debug for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tier")
            .field("prefix", &self.prefix)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn remote_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Remote(format!("{what}: {e}"))
}

/// Reads chunk `cid` of a segment with `used` blocks from the local file: the buffer and
/// the chunk's block count.
async fn read_chunk(
    local: &LocalStore,
    seg: &Segment,
    cid: ChunkId,
    used: u32,
) -> Result<(Arc<AlignedBuf>, usize)> {
    let first = cid.number() * CHUNK_BLOCKS;
    let blocks = (used - first).min(CHUNK_BLOCKS) as usize;
    let buf = Arc::new(AlignedBuf::for_overwrite(blocks * BLOCK_SIZE));
    local
        .ring()
        .read_at(
            &seg.file,
            first as u64 * BLOCK_SIZE as u64,
            &buf,
            0,
            blocks * BLOCK_SIZE,
        )
        .await
        .map_err(|e| Error::io(seg.path.display().to_string(), e))?;
    Ok((buf, blocks))
}

/// A segment that can be evicted from: (last read ms, segment, [(chunk#, resident bytes)]).
type CleanSegment = (u64, Arc<Segment>, Vec<(u32, u64)>);

impl Tier {
    pub fn open(
        meta_dir: &std::path::Path,
        store: Arc<dyn ObjectStore>,
        prefix: ObjPath,
        cfg: TierConfig,
    ) -> Result<Tier> {
        Ok(Tier {
            meta: Meta::open(meta_dir)?,
            store,
            prefix,
            cfg,
            inflight: Mutex::new(HashMap::new()),
            last_fetch: Mutex::new(HashMap::new()),
            stats: TierStats::default(),
            drained: tokio::sync::Notify::new(),
        })
    }

    pub fn config(&self) -> &TierConfig {
        &self.cfg
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// `<prefix>/<rel>`.
    pub fn key(&self, rel: &str) -> ObjPath {
        let mut p = self.prefix.clone();
        for part in rel.split('/') {
            p = p.join(part);
        }
        p
    }

    fn chunk_key(&self, hash: &str) -> ObjPath {
        self.key(&format!("chunks/{hash}"))
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Runs an object-store request, retrying transient failures with backoff.
    pub async fn retry<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = object_store::Result<T>>,
    {
        let mut delay = Duration::from_millis(20);
        let mut attempt = 1;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    self.stats.request_errors.fetch_add(1, Ordering::Relaxed);
                    let permanent = matches!(
                        e,
                        object_store::Error::NotFound { .. }
                            | object_store::Error::AlreadyExists { .. }
                            | object_store::Error::Precondition { .. }
                            | object_store::Error::NotModified { .. }
                            | object_store::Error::NotImplemented { .. }
                            | object_store::Error::InvalidPath { .. }
                    );
                    match &e {
                        object_store::Error::NotFound { path, .. } => {
                            return Err(Error::ObjectNotFound(format!("{what}: {path}")));
                        }
                        object_store::Error::AlreadyExists { path, .. } => {
                            return Err(Error::ObjectExists(format!("{what}: {path}")));
                        }
                        _ => {}
                    }
                    if permanent || attempt >= self.cfg.attempts {
                        return Err(remote_err(what, e));
                    }
                    tracing::debug!("{what} failed (attempt {attempt}), retrying: {e}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    attempt += 1;
                }
            }
        }
    }

    // ---- upload -------------------------------------------------------------------

    /// Is this segment uploaded?
    pub fn uploaded(&self, seg: u64) -> Result<bool> {
        Ok(self.meta.seg(seg)?.is_some())
    }

    /// Uploads one sealed, idle segment: every chunk `live` says is still referenced
    /// becomes an object (unless an identical one is already referenced here), then the
    /// segment is recorded as uploaded.
    pub async fn upload_segment(
        &self,
        local: &LocalStore,
        seg: &Arc<Segment>,
        live: &(dyn Fn(ChunkId) -> bool + Sync),
    ) -> Result<()> {
        // Pinned, the file cannot be recycled under the upload; one removed before the pin
        // needs no upload.
        let _pin = crate::local::ReadPin::new(seg);
        if seg.removed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let used = seg.used_blocks.load(Ordering::Acquire);
        let nchunks = used.div_ceil(CHUNK_BLOCKS);
        let mut recorded: Vec<(u64, ChunkLayout)> = Vec::new();
        let mut object_bytes = 0;
        let mut pending = futures::stream::FuturesOrdered::new();
        let mut k = 0;
        loop {
            while k < nchunks && pending.len() < self.cfg.upload_concurrency.max(1) {
                let cid = ChunkId(seg.id << 8 | k as u64);
                if live(cid) {
                    pending.push_back(self.upload_chunk(local, seg, cid, used));
                }
                k += 1;
            }
            use futures::StreamExt;
            match pending.next().await {
                Some(r) => {
                    let (cid, layout): (u64, ChunkLayout) = r?;
                    object_bytes += layout.object_bytes;
                    recorded.push((cid, layout));
                }
                None => break,
            }
        }
        let rec = SegRecord {
            stream: seg.stream,
            epoch: self.meta.next_epoch()?,
            blocks: used,
            object_bytes,
        };
        fail::fail_point!("chunkstore::upload::before_record", |_| Err(
            Error::Injected("chunkstore::upload::before_record")
        ));
        self.meta.record_upload(seg.id, &rec, &recorded)?;
        // The local file holds everything: all frames resident.
        *seg.resident.lock() = Some(crate::segment::all_frames(used));
        local.uploaded(used as u64 * BLOCK_SIZE as u64);
        self.drained.notify_waiters();
        Ok(())
    }

    /// Uploads a chunk unless an identical object is already stored (dedup).
    async fn upload_chunk(
        &self,
        local: &LocalStore,
        seg: &Arc<Segment>,
        cid: ChunkId,
        used: u32,
    ) -> Result<(u64, ChunkLayout)> {
        let (obj, layout) = self.encode_chunk(local, seg, cid, used).await?;
        if self.meta.obj_refs(&layout.hash)? > 0 {
            self.stats.dedup_chunks.fetch_add(1, Ordering::Relaxed);
        } else {
            fail::fail_point!("chunkstore::upload::before_put", |_| Err(Error::Injected(
                "chunkstore::upload::before_put"
            )));
            self.put_chunk(&layout, obj).await?;
        }
        Ok((cid.0, layout))
    }

    /// Reads a chunk from its segment file and compresses it (off the async threads).
    async fn encode_chunk(
        &self,
        local: &LocalStore,
        seg: &Segment,
        cid: ChunkId,
        used: u32,
    ) -> Result<(Vec<u8>, ChunkLayout)> {
        let (buf, blocks) = read_chunk(local, seg, cid, used).await?;
        let level = self.cfg.zstd_level;
        tokio::task::spawn_blocking(move || {
            format::encode(&buf.as_slice()[..blocks * BLOCK_SIZE], level)
        })
        .await
        .map_err(|e| Error::Invalid(format!("compression task: {e}")))?
        .map_err(|e| Error::Invalid(e.to_string()))
    }

    async fn put_chunk(&self, layout: &ChunkLayout, obj: Vec<u8>) -> Result<()> {
        let key = self.chunk_key(&layout.hash);
        let body = bytes::Bytes::from(obj);
        self.retry("upload chunk", || {
            self.store
                .put(&key, object_store::PutPayload::from(body.clone()))
        })
        .await?;
        self.stats.uploaded_chunks.fetch_add(1, Ordering::Relaxed);
        self.stats
            .uploaded_bytes
            .fetch_add(layout.object_bytes, Ordering::Relaxed);
        Ok(())
    }

    /// A manifest is about to reference these chunks: check their objects exist (another
    /// host's GC may have removed an identical object this host deduplicated against) and
    /// re-upload any that vanished, from the local copy (a chunk not yet manifested is never
    /// evicted). Afterwards the chunks count as clean (evictable).
    pub async fn manifest_chunks(&self, local: &LocalStore, chunks: &[u64]) -> Result<()> {
        let mut newly = Vec::new();
        for &c in chunks {
            if self.meta.manifested(c)? {
                continue;
            }
            let Some(layout) = self.meta.chunk(c)? else {
                return Err(Error::Remote(format!("chunk {c:x} is not uploaded")));
            };
            let key = self.chunk_key(&layout.hash);
            match self.retry("check chunk", || self.store.head(&key)).await {
                Ok(_) => {}
                Err(Error::ObjectNotFound(_)) => {
                    let cid = ChunkId(c);
                    let seg = local.segment(cid.segment()).ok_or_else(|| {
                        Error::Remote(format!(
                            "chunk {c:x} vanished from the store and is not local"
                        ))
                    })?;
                    tracing::warn!(chunk = c, "chunk object vanished; uploading it again");
                    let used = seg.used_blocks.load(Ordering::Acquire);
                    let (obj, layout) = self.encode_chunk(local, &seg, cid, used).await?;
                    self.put_chunk(&layout, obj).await?;
                }
                Err(e) => return Err(e),
            }
            newly.push(c);
        }
        self.meta.mark_manifested(&newly)
    }

    // ---- fetch --------------------------------------------------------------------

    /// Makes blocks `[block, block + n)` of a segment present in its file, fetching the
    /// missing frames from the object store (with readahead).
    pub async fn ensure_resident(
        &self,
        local: &LocalStore,
        seg: &Arc<Segment>,
        block: u32,
        n: u32,
    ) -> Result<()> {
        seg.last_access.store(now_ms(), Ordering::Relaxed);
        let (f0, f1) = (block / FRAME_BLOCKS, (block + n).div_ceil(FRAME_BLOCKS));
        let missing: Vec<u32> = {
            let r = seg.resident.lock();
            let Some(bits) = r.as_ref() else {
                return Ok(()); // authoritative local file
            };
            // A frame past the bitmap is missing (the fetch then fails cleanly if the
            // chunk has no such frame) rather than a panic.
            (f0..f1)
                .filter(|f| {
                    bits.get((f / 64) as usize)
                        .is_none_or(|w| w & (1 << (f % 64)) == 0)
                })
                .collect()
        };
        if missing.is_empty() {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
        // Sequential pattern: this miss starts right after the last fetched frame.
        let total_frames = seg
            .used_blocks
            .load(Ordering::Acquire)
            .div_ceil(FRAME_BLOCKS);
        let mut wanted = missing.clone();
        let sequential = self
            .last_fetch
            .lock()
            .get(&seg.id)
            .is_some_and(|last| missing[0] == last + 1 || missing[0] == *last);
        if sequential {
            let end =
                (missing[missing.len() - 1] + 1 + self.cfg.readahead_frames).min(total_frames);
            wanted.extend(missing[missing.len() - 1] + 1..end);
        }
        // Claim the frames nobody is fetching yet; wait for the others.
        let mut mine: Vec<u32> = Vec::new();
        let mut cells: Vec<(u32, FetchCell)> = Vec::new();
        {
            let mut inflight = self.inflight.lock();
            for f in &wanted {
                match inflight.get(&(seg.id, *f)) {
                    Some(c) => cells.push((*f, c.clone())),
                    None => {
                        let c: FetchCell = Arc::new(FetchState::default());
                        inflight.insert((seg.id, *f), c.clone());
                        cells.push((*f, c));
                        mine.push(*f);
                    }
                }
            }
        }
        if let Some(last) = wanted.last() {
            self.last_fetch.lock().insert(seg.id, *last);
        }
        let mut claimed = Claimed {
            tier: self,
            seg: seg.id,
            frames: mine.clone(),
            outcome: None,
        };
        let result = if mine.is_empty() {
            Ok(())
        } else {
            self.fetch_frames(local, seg, &mine).await
        };
        claimed.outcome = Some(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        drop(claimed);
        result?;
        // Frames others were fetching: only those the request needs must have arrived.
        for (f, c) in cells {
            if f < f0 || f >= f1 || mine.contains(&f) {
                continue;
            }
            if let Err(e) = c.wait().await {
                return Err(Error::Remote(format!("fetch of frame {f} failed: {e}")));
            }
        }
        Ok(())
    }

    /// Fetches frames (sorted) of a segment: one ranged GET per run of consecutive frames
    /// within one chunk object, written into the segment file.
    async fn fetch_frames(
        &self,
        local: &LocalStore,
        seg: &Arc<Segment>,
        frames: &[u32],
    ) -> Result<()> {
        let per_chunk = CHUNK_BLOCKS / FRAME_BLOCKS;
        let mut i = 0;
        let mut runs = Vec::new();
        while i < frames.len() {
            let mut j = i + 1;
            while j < frames.len()
                && frames[j] == frames[j - 1] + 1
                && frames[j] / per_chunk == frames[i] / per_chunk
            {
                j += 1;
            }
            runs.push(&frames[i..j]);
            i = j;
        }
        let futs = runs.into_iter().map(|run| self.fetch_run(local, seg, run));
        for r in futures::future::join_all(futs).await {
            r?;
        }
        Ok(())
    }

    async fn fetch_run(&self, local: &LocalStore, seg: &Arc<Segment>, run: &[u32]) -> Result<()> {
        let per_chunk = CHUNK_BLOCKS / FRAME_BLOCKS;
        let cid = ChunkId(seg.id << 8 | (run[0] / per_chunk) as u64);
        let layout = self.meta.chunk(cid.0)?.ok_or_else(|| {
            Error::Remote(format!(
                "no uploaded chunk {:x} for segment {:016x}",
                cid.0, seg.id
            ))
        })?;
        let (a, b) = (
            (run[0] % per_chunk) as usize,
            (run[run.len() - 1] % per_chunk) as usize,
        );
        if b >= layout.frames.len() {
            return Err(Error::Remote(format!("chunk {:x} has no frame {b}", cid.0)));
        }
        let start = layout.frames[a].offset;
        let end = layout.frames[b].offset + layout.frames[b].len as u64;
        let key = self.chunk_key(&layout.hash);
        let nblocks = layout.blocks as usize;
        // A body that fails to decode was damaged on the way: fetch it again (the store's
        // own transient errors are retried inside `retry`).
        let mut attempt = 0;
        let raw = loop {
            attempt += 1;
            fail::fail_point!("chunkstore::fetch::before_get", |_| Err(Error::Injected(
                "chunkstore::fetch::before_get"
            )));
            let bytes = self
                .retry("fetch chunk", || self.store.get_range(&key, start..end))
                .await?;
            self.stats.fetches.fetch_add(1, Ordering::Relaxed);
            self.stats
                .fetched_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            match decode_run(&layout, &bytes, start, a, b, nblocks) {
                Ok(raw) => break raw,
                Err(e) if attempt < self.cfg.attempts => {
                    self.stats
                        .checksum_refetches
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(chunk = %layout.hash, "fetched frames do not decode ({e}); fetching again");
                }
                Err(e) => return Err(e),
            }
        };
        fail::fail_point!("chunkstore::fetch::before_fill", |_| Err(Error::Injected(
            "chunkstore::fetch::before_fill"
        )));
        let buf = Arc::new(AlignedBuf::from_slice(&raw));
        let file_block = run[0] * FRAME_BLOCKS;
        local
            .ring()
            .write_at(
                &seg.file,
                file_block as u64 * BLOCK_SIZE as u64,
                &buf,
                0,
                raw.len(),
            )
            .await
            .map_err(|e| Error::io(seg.path.display().to_string(), e))?;
        let mut r = seg.resident.lock();
        if let Some(bits) = r.as_mut() {
            for f in run {
                if let Some(w) = bits.get_mut((f / 64) as usize) {
                    *w |= 1 << (f % 64);
                }
            }
        }
        Ok(())
    }

    /// Drops frames whose content failed its checksum so the next read fetches them again.
    pub fn invalidate(&self, seg: &Segment, block: u32, n: u32) -> bool {
        let mut r = seg.resident.lock();
        let Some(bits) = r.as_mut() else {
            return false; // authoritative local file: nothing to refetch
        };
        for f in block / FRAME_BLOCKS..(block + n).div_ceil(FRAME_BLOCKS) {
            bits[(f / 64) as usize] &= !(1 << (f % 64));
        }
        self.stats
            .checksum_refetches
            .fetch_add(1, Ordering::Relaxed);
        true
    }

    // ---- eviction -----------------------------------------------------------------

    /// Resident bytes of clean chunks (uploaded and covered by a manifest); evicts the
    /// least recently read segments' clean chunks until they fit the cache budget. Dirty
    /// data is never evicted. Returns bytes evicted.
    pub fn evict_round(&self, local: &LocalStore) -> Result<u64> {
        let per_chunk = CHUNK_BLOCKS / FRAME_BLOCKS;
        let mut clean: Vec<CleanSegment> = Vec::new();
        let mut total = 0u64;
        for seg in local.segments() {
            if !seg.sealed.load(Ordering::Acquire) || seg.resident.lock().is_none() {
                continue;
            }
            let used = seg.used_blocks.load(Ordering::Acquire);
            let mut chunks = Vec::new();
            for k in 0..used.div_ceil(CHUNK_BLOCKS) {
                if !self.meta.manifested(seg.id << 8 | k as u64)? {
                    continue;
                }
                let frames = k * per_chunk..((k + 1) * per_chunk).min(used.div_ceil(FRAME_BLOCKS));
                let bytes = resident_frames(&seg, frames) * FRAME_BLOCKS as u64 * BLOCK_SIZE as u64;
                if bytes > 0 {
                    total += bytes;
                    chunks.push((k, bytes));
                }
            }
            if !chunks.is_empty() {
                clean.push((seg.last_access.load(Ordering::Relaxed), seg, chunks));
            }
        }
        if total <= self.cfg.cache_bytes {
            self.stats.cached_bytes.store(total, Ordering::Relaxed);
            return Ok(0);
        }
        clean.sort_by_key(|(t, _, _)| *t);
        let mut evicted = 0;
        'outer: for (_, seg, chunks) in clean {
            for (k, bytes) in chunks {
                if total <= self.cfg.cache_bytes {
                    break 'outer;
                }
                fail::fail_point!("chunkstore::evict", |_| Err(Error::Injected(
                    "chunkstore::evict"
                )));
                if !local.evict_frames(&seg, k * per_chunk, per_chunk) {
                    continue 'outer; // being read: try the next segment
                }
                total -= bytes;
                evicted += bytes;
            }
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
        self.stats
            .evicted_bytes
            .fetch_add(evicted, Ordering::Relaxed);
        self.stats.cached_bytes.store(total, Ordering::Relaxed);
        Ok(evicted)
    }

    // ---- garbage collection -------------------------------------------------------

    /// A chunk nothing references any more: forget it; if its object lost its last local
    /// reference, schedule the object's deletion after the grace period.
    pub fn release_chunk(&self, cid: ChunkId) -> Result<()> {
        let after = now_ms() + self.cfg.gc_grace.as_millis() as u64;
        self.meta.release_chunk(cid.0, after)?;
        Ok(())
    }

    /// Deletes objects whose deletion is due and that no manifest references (`refs` says
    /// which manifests do). Returns how many were deleted.
    pub async fn gc_round(&self, refs: &(dyn Fn(&str) -> ManifestRefs + Sync)) -> Result<usize> {
        let mut n = 0;
        for hash in self.meta.due_deletes(now_ms())? {
            if self.meta.obj_refs(&hash)? > 0 {
                self.meta.deleted(&hash)?; // referenced again meanwhile
                continue;
            }
            match refs(&hash) {
                ManifestRefs::None => {}
                ManifestRefs::OtherHost => {
                    self.meta.deleted(&hash)?; // another host's volume needs it: theirs now
                    continue;
                }
                ManifestRefs::ThisHost => {
                    let after = now_ms() + self.cfg.gc_grace.as_millis() as u64;
                    self.meta.schedule_delete(&hash, after)?;
                    continue;
                }
            }
            let key = self.chunk_key(&hash);
            fail::fail_point!("chunkstore::gc::before_delete", |_| Err(Error::Injected(
                "chunkstore::gc::before_delete"
            )));
            match self.retry("delete chunk", || self.store.delete(&key)).await {
                Ok(()) => {}
                Err(Error::ObjectNotFound(_)) => {}
                Err(e) => return Err(e),
            }
            fail::fail_point!("chunkstore::gc::after_delete", |_| Err(Error::Injected(
                "chunkstore::gc::after_delete"
            )));
            self.meta.deleted(&hash)?;
            self.stats.deleted_objects.fetch_add(1, Ordering::Relaxed);
            n += 1;
        }
        Ok(n)
    }

    /// Compressed bytes of the live chunks of each append stream (one volume each).
    pub fn stored_bytes_by_stream(&self) -> Result<HashMap<u64, u64>> {
        let mut out = HashMap::new();
        for (seg, rec) in self.meta.segs()? {
            let bytes: u64 = self
                .meta
                .seg_chunks(seg)?
                .iter()
                .map(|(_, l)| l.object_bytes)
                .sum();
            *out.entry(rec.stream).or_insert(0) += bytes;
        }
        Ok(out)
    }
}

/// Decodes frames `a..=b` of a chunk from the bytes of one ranged read starting at `start`.
fn decode_run(
    layout: &ChunkLayout,
    bytes: &[u8],
    start: u64,
    a: usize,
    b: usize,
    nblocks: usize,
) -> Result<Vec<u8>> {
    let mut raw = Vec::with_capacity((b - a + 1) * FRAME_BLOCKS as usize * BLOCK_SIZE);
    for fi in a..=b {
        let f = layout.frames[fi];
        let off = (f.offset - start) as usize;
        let data = bytes
            .get(off..off + f.len as usize)
            .ok_or_else(|| Error::Remote(format!("short ranged read of chunk {}", layout.hash)))?;
        let n = format::frame_blocks(nblocks, fi);
        raw.extend(format::decode_frame(data, n).map_err(|e| Error::Remote(e.to_string()))?);
    }
    Ok(raw)
}

fn resident_frames(seg: &Segment, frames: std::ops::Range<u32>) -> u64 {
    match seg.resident.lock().as_ref() {
        Some(bits) => frames
            .filter(|f| bits[(f / 64) as usize] & (1 << (f % 64)) != 0)
            .count() as u64,
        None => 0,
    }
}
