//! Volumes: create, list, stat, delete, and the data-path commits that record writes and
//! discards in the block map.

use crate::catalog::{TimelineMut, TimelineState, VolumeAdmin, VolumeState};
use crate::codec::{Counters, MapValue, Version, head_key, map_key};
use crate::db::{self, CF_HEADS, CF_MAP, cf};
use crate::engine::{Inner, Released, Snapshotter, Work, now_ms};
use crate::error::{Error, Result};
use crate::ids::{BLOCK_SIZE, Lba, PhysBlock, Seq, TimelineId, VolumeId};
use crate::map::{Found, Mapping};
use crate::records::{TimelineRecord, VolumeRecord};
use parking_lot::{MutexGuard, RwLock};
use rocksdb::WriteBatch;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What `volume list` / `volume stat` report. Byte counts are multiples of the block size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub id: u64,
    pub size_bytes: u64,
    pub created_unix_ms: u64,
    pub cloned_from: Option<String>,
    /// Written (not trimmed) bytes visible in the head, including bytes shared from the
    /// volume it was cloned from.
    pub head_bytes: u64,
    /// Head bytes this volume shares with the volume it was cloned from (not billed here).
    pub head_shared_bytes: u64,
    /// Bytes this volume holds only because checkpoints still see them.
    pub checkpoint_only_bytes: u64,
    /// All bytes this volume holds (head + checkpoint-only).
    pub owned_bytes: u64,
    pub checkpoints: u64,
    /// Timelines a read of an unwritten block may visit (kept small by flattening).
    pub read_depth: u64,
    /// The volume's data stream id.
    pub stream: u64,
    /// Memory the head's block-mapping cache holds (at most `Options::head_cache_bytes`).
    pub map_cache_bytes: u64,
}

/// Result of a data-path commit.
#[derive(Debug, Default)]
pub struct Commit {
    /// The seq the request was committed at (unchanged if it changed nothing).
    pub seq: Seq,
    pub released: Released,
}

pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Snapshotter {
    pub fn create_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo> {
        if !valid_name(name) {
            return Err(Error::InvalidName(name.to_string()));
        }
        if size_bytes == 0 || !size_bytes.is_multiple_of(BLOCK_SIZE) {
            return Err(Error::InvalidSize(size_bytes));
        }
        let inner = &self.inner;
        let mut cat = inner.catalog.write();
        if cat.volumes.contains_key(name) {
            return Err(Error::VolumeExists(name.to_string()));
        }
        let vid = VolumeId(cat.next_volume_id);
        let tid = TimelineId(cat.next_timeline_id);
        cat.next_volume_id += 1;
        cat.next_timeline_id += 1;
        let rec = VolumeRecord {
            id: vid,
            name: name.to_string(),
            size_bytes,
            head: tid,
            next_checkpoint: 1,
            created_unix_ms: now_ms(),
            cloned_from: None,
            stream: crate::records::new_stream_id(),
        };
        let trec = TimelineRecord {
            id: tid,
            volume: vid,
            parent: None,
            flattened: false,
        };
        let mut b = WriteBatch::default();
        inner.put_ids(&mut b, &cat);
        inner.put_volume(&mut b, &rec);
        inner.put_timeline(&mut b, &trec);
        fail::fail_point!("snapshotter::create_volume", |_| Err(Error::Injected(
            "snapshotter::create_volume"
        )));
        db::write(&inner.db, b, true)?;
        let vs = inner.install_volume(&mut cat, rec, trec, None, Counters::default());
        drop(cat);
        Ok(self.info_of(&vs))
    }

    pub fn list_volumes(&self) -> Vec<VolumeInfo> {
        let vols: Vec<Arc<VolumeState>> = self
            .inner
            .catalog
            .read()
            .volumes
            .values()
            .cloned()
            .collect();
        let mut out: Vec<VolumeInfo> = vols.iter().map(|v| self.info_of(v)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn stat(&self, name: &str) -> Result<VolumeInfo> {
        let v = self.inner.volume(name)?;
        Ok(self.info_of(&v))
    }

    pub(crate) fn info_of(&self, v: &VolumeState) -> VolumeInfo {
        let c = *v.counters.lock();
        let checkpoints = v.admin.lock().checkpoints.len() as u64;
        let b = |n: i64| n.max(0) as u64 * BLOCK_SIZE;
        VolumeInfo {
            name: v.name.clone(),
            id: v.id.0,
            size_bytes: v.size_bytes,
            created_unix_ms: v.created_unix_ms,
            cloned_from: v.cloned_from.clone(),
            head_bytes: b(c.head_blocks),
            head_shared_bytes: b(c.head_blocks - c.head_owned_blocks),
            checkpoint_only_bytes: b(c.owned_blocks - c.head_owned_blocks),
            owned_bytes: b(c.owned_blocks),
            checkpoints,
            read_depth: v.head().read_depth() as u64,
            stream: v.stream,
            map_cache_bytes: v.head().cache.resident_bytes() as u64,
        }
    }

    /// A handle for the data path.
    pub fn volume(&self, name: &str) -> Result<VolumeHandle> {
        Ok(VolumeHandle {
            inner: self.inner.clone(),
            vol: self.inner.volume(name)?,
        })
    }

    /// Deletes a volume and all its checkpoints. Bytes a clone still reads stay until that
    /// clone no longer needs them; everything else is released by background GC.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let inner = &self.inner;
        let mut cat = inner.catalog.write();
        let vs = cat
            .volumes
            .get(name)
            .cloned()
            .ok_or_else(|| Error::VolumeNotFound(name.to_string()))?;
        let admin = vs.admin.lock();
        let head = vs.head();
        let mut b = WriteBatch::default();
        b.delete_cf(cf(&inner.db, db::CF_VOLUMES), name.as_bytes());
        b.delete_cf(
            cf(&inner.db, db::CF_VOLSTATS),
            crate::codec::u64_key(vs.id.0),
        );
        let mut touched: BTreeMap<TimelineId, Arc<TimelineState>> = BTreeMap::new();
        touched.insert(head.id, head.clone());
        for cp in admin.checkpoints.values() {
            b.delete_cf(
                cf(&inner.db, db::CF_CHECKPOINTS),
                crate::codec::checkpoint_key(cp.volume.0, cp.id.0),
            );
            if let Some(t) = cat.timeline(cp.timeline) {
                touched.insert(t.id, t.clone());
            }
        }
        for t in touched.keys() {
            inner.schedule(&mut b, Work::Gc(*t));
        }
        fail::fail_point!("snapshotter::delete_volume", |_| Err(Error::Injected(
            "snapshotter::delete_volume"
        )));
        // Lock the touched timelines (ascending) so no commit races the head change.
        let mut guards: Vec<MutexGuard<'_, TimelineMut>> =
            touched.values().map(|t| t.m.lock()).collect();
        db::write(&inner.db, b, true)?;
        for (t, g) in touched.values().zip(guards.iter_mut()) {
            if t.id == head.id {
                g.is_head = false;
            }
            for cp in admin.checkpoints.values() {
                if cp.timeline == t.id {
                    g.remove_retention(cp.seq);
                }
            }
        }
        drop(guards);
        vs.deleted.store(true, Ordering::Release);
        drop(admin);
        cat.volumes.remove(name);
        cat.by_id.remove(&vs.id);
        Ok(())
    }
}

impl Inner {
    pub(crate) fn volume(&self, name: &str) -> Result<Arc<VolumeState>> {
        self.catalog
            .read()
            .volumes
            .get(name)
            .cloned()
            .ok_or_else(|| Error::VolumeNotFound(name.to_string()))
    }

    /// Adds a freshly persisted volume and its head timeline to the catalog.
    pub(crate) fn install_volume(
        &self,
        cat: &mut crate::catalog::Catalog,
        rec: VolumeRecord,
        trec: TimelineRecord,
        parent: Option<(Arc<TimelineState>, Seq)>,
        counters: Counters,
    ) -> Arc<VolumeState> {
        let t = Arc::new(TimelineState {
            id: trec.id,
            volume: trec.volume,
            parent,
            flattened: AtomicBool::new(trec.flattened),
            m: parking_lot::Mutex::new(TimelineMut {
                is_head: true,
                ..Default::default()
            }),
            cache: Default::default(),
        });
        cat.timelines.insert(t.id, t.clone());
        let vs = Arc::new(VolumeState {
            id: rec.id,
            name: rec.name.clone(),
            size_bytes: rec.size_bytes,
            created_unix_ms: rec.created_unix_ms,
            cloned_from: rec.cloned_from.clone(),
            stream: rec.stream,
            head: RwLock::new(t),
            admin: parking_lot::Mutex::new(VolumeAdmin {
                next_checkpoint: rec.next_checkpoint,
                checkpoints: BTreeMap::new(),
            }),
            counters: parking_lot::Mutex::new(counters),
            deleted: AtomicBool::new(false),
        });
        cat.by_id.insert(rec.id, vs.clone());
        cat.volumes.insert(rec.name, vs.clone());
        vs
    }

    /// Accumulates what dropping version `f` (of timeline volume `vol`) releases.
    pub(crate) fn release_version(
        f: &MapValue,
        released: &mut Released,
        groups: &mut HashMap<u64, i64>,
        delta: &mut Counters,
    ) {
        if let MapValue::Owned { phys, .. } = f {
            released.blocks.push(*phys);
            *groups.entry(phys.group).or_insert(0) -= 1;
            delta.owned_blocks -= 1;
        }
    }
}

/// The data-path view of one volume. Cheap to clone.
#[derive(Debug, Clone)]
pub struct VolumeHandle {
    inner: Arc<Inner>,
    vol: Arc<VolumeState>,
}

/// Lookups of at most this many blocks use the head's cache; longer ones (large sequential
/// reads) scan the map, which costs little per block, and fill the cache on the way.
const HEAD_CACHE_MAX_BLOCKS: usize = 1024;

/// A lookup that misses the cache resolves the aligned window of this many blocks around
/// it (one map scan) and caches all of it: random reads warm the cache a window at a time
/// instead of a block at a time.
const HEAD_CACHE_WINDOW_BLOCKS: u64 = 256;

/// One block for [`VolumeHandle::relocate`]: block `lba`, stored at `from` with crc32c `crc`,
/// has an identical copy at `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relocation {
    pub lba: u64,
    pub from: PhysBlock,
    pub to: PhysBlock,
    pub crc: u32,
}

/// What [`VolumeHandle::relocate`] did.
#[derive(Debug, Default)]
pub struct Relocated {
    /// Blocks that now point at their new address.
    pub moved: usize,
    /// The old addresses of the moved blocks (reclaim them as usual).
    pub released: Released,
    /// New addresses nothing references (the block changed or is shared): free them.
    pub rejected: Vec<PhysBlock>,
}

/// What one block of a commit becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockUpdate {
    /// New bytes (address and crc32c).
    Data(PhysBlock, u32),
    /// Reads as zeros (discard, write-zeroes, or a written block that was all zeros).
    Zero,
}

impl VolumeHandle {
    pub fn name(&self) -> &str {
        &self.vol.name
    }

    pub fn id(&self) -> VolumeId {
        self.vol.id
    }

    pub fn size_bytes(&self) -> u64 {
        self.vol.size_bytes
    }

    /// The volume's data stream id (see `VolumeRecord::stream`).
    pub fn stream(&self) -> u64 {
        self.vol.stream
    }

    pub fn is_deleted(&self) -> bool {
        self.vol.is_deleted()
    }

    fn check(&self, lba0: u64, n: usize) -> Result<()> {
        if self.vol.is_deleted() {
            return Err(Error::VolumeNotFound(self.vol.name.clone()));
        }
        let end = lba0.checked_add(n as u64);
        if end.is_none_or(|e| e * BLOCK_SIZE > self.vol.size_bytes) {
            return Err(Error::Corrupt(format!(
                "blocks {lba0}+{n} beyond the end of volume {:?}",
                self.vol.name
            )));
        }
        Ok(())
    }

    /// What the head shows for blocks `[lba0, lba0 + n)`.
    /// Goes through the head's cache (see [`crate::headcache`]) when it is enabled.
    pub fn lookup(&self, lba0: u64, n: usize) -> Result<Vec<Mapping>> {
        self.check(lba0, n)?;
        let head = self.vol.head();
        let budget = self.inner.opts.head_cache_bytes;
        if budget == 0 {
            return self.resolve_head(&head, lba0, n);
        }
        // Small misses widen to whole windows; large lookups resolve what they asked for.
        let (w0, wn) = if n <= HEAD_CACHE_MAX_BLOCKS {
            if let Some(hit) = head.cache.get(lba0, n) {
                return Ok(hit);
            }
            let w0 = lba0 - lba0 % HEAD_CACHE_WINDOW_BLOCKS;
            let end = (lba0 + n as u64)
                .next_multiple_of(HEAD_CACHE_WINDOW_BLOCKS)
                .min(self.blocks());
            (w0, (end - w0) as usize)
        } else {
            (lba0, n)
        };
        let ticket = head.cache.ticket(self.blocks(), w0, wn);
        let mut maps = self.resolve_head(&head, w0, wn)?;
        head.cache.fill(&ticket, w0, &maps, budget);
        let skip = (lba0 - w0) as usize;
        maps.truncate(skip + n);
        maps.drain(..skip);
        Ok(maps)
    }

    fn resolve_head(&self, head: &Arc<TimelineState>, lba0: u64, n: usize) -> Result<Vec<Mapping>> {
        Ok(self
            .inner
            .resolve(head, Seq::MAX, lba0, n)?
            .into_iter()
            .map(|f| f.map_or(Mapping::Zero, |f| f.mapping()))
            .collect())
    }

    /// The volume's size in blocks.
    fn blocks(&self) -> u64 {
        self.vol.size_bytes / BLOCK_SIZE
    }

    /// Records that blocks `[lba0, lba0 + blocks.len())` now hold the given bytes.
    pub fn commit_write(&self, lba0: u64, blocks: &[(PhysBlock, u32)]) -> Result<Commit> {
        let updates: Vec<BlockUpdate> = blocks
            .iter()
            .map(|(p, c)| BlockUpdate::Data(*p, *c))
            .collect();
        self.commit_blocks(lba0, &updates)
    }

    /// Records that blocks `[lba0, lba0 + n)` read as zeros (discard / write-zeroes).
    pub fn commit_zero(&self, lba0: u64, n: usize) -> Result<Commit> {
        self.commit_blocks(lba0, &vec![BlockUpdate::Zero; n])
    }

    /// Records one request's changes to blocks `[lba0, lba0 + updates.len())` as one batch
    /// at one seq (each block is atomic: old or new, never torn).
    pub fn commit_blocks(&self, lba0: u64, updates: &[BlockUpdate]) -> Result<Commit> {
        self.check(lba0, updates.len())?;
        self.commit(lba0, updates)
    }

    fn commit(&self, lba0: u64, updates: &[BlockUpdate]) -> Result<Commit> {
        let mut v = self.commit_group_checked(&[(lba0, updates)])?;
        Ok(v.pop().unwrap_or_default())
    }

    /// Commits several requests at once: one RocksDB batch (one WAL write), each request
    /// with its own seq, in order, exactly as if committed one after the other. Used by
    /// the write pipeline to amortise the commit over concurrent writes.
    pub fn commit_group(&self, items: &[(u64, &[BlockUpdate])]) -> Result<Vec<Commit>> {
        for (lba0, updates) in items {
            self.check(*lba0, updates.len())?;
        }
        self.commit_group_checked(items)
    }

    fn commit_group_checked(&self, items: &[(u64, &[BlockUpdate])]) -> Result<Vec<Commit>> {
        let inner = &self.inner;
        loop {
            let head = self.vol.head();
            let mut tm = head.m.lock();
            if !tm.is_head || self.vol.is_deleted() {
                // A restore moved the head (retry there) or the volume went away.
                if self.vol.is_deleted() {
                    return Err(Error::VolumeNotFound(self.vol.name.clone()));
                }
                continue;
            }
            let map = cf(&inner.db, CF_MAP);
            let mut b = WriteBatch::default();
            let mut delta = Counters::default();
            let mut groups: HashMap<u64, i64> = HashMap::new();
            let mut commits: Vec<Commit> = Vec::with_capacity(items.len());
            // Versions written by earlier requests of this group (not in the DB yet).
            let mut overlay: HashMap<u64, Found> = HashMap::new();
            let mut seq = tm.head_seq;
            for (item, (lba0, updates)) in items.iter().enumerate() {
                let (lba0, n) = (*lba0, updates.len());
                // Only a later request of this group reads the overlay: the last (or only)
                // one does not fill it (256 inserts per MiB showed in the profile).
                let record_overlay = item + 1 < items.len();
                // The head's current versions: its own head slots (point lookups), else what
                // it sees through its ancestors.
                let mut found = match head.cache.own_versions(lba0, n) {
                    // Exact under `tm` (see `HeadCache::own_versions`).
                    Some(own) => own
                        .into_iter()
                        .map(|(phys, crc, seq)| Some(Found::own_head(&head, phys, crc, seq)))
                        .collect(),
                    None => inner.head_versions(&head, lba0, n)?,
                };
                if found.iter().any(Option::is_none)
                    && !head.is_flattened()
                    && let Some((parent, branch)) = &head.parent
                {
                    let seen = inner.resolve(parent, *branch, lba0, n)?;
                    for (f, a) in found.iter_mut().zip(seen) {
                        if f.is_none() {
                            *f = a;
                        }
                    }
                }
                if !overlay.is_empty() {
                    for (i, f) in found.iter_mut().enumerate() {
                        if let Some(o) = overlay.get(&(lba0 + i as u64)) {
                            *f = Some(*o);
                        }
                    }
                }
                let item_seq = Seq(seq.0 + 1);
                let mut released = Released::default();
                let mut changed = false;
                for (i, old) in found.iter().enumerate() {
                    let lba = Lba(lba0 + i as u64);
                    let old_data = old.filter(|f| f.value.data().is_some());
                    let old_owned = old_data.is_some_and(|f| f.owner == Some(self.vol.id));
                    let new_value = match updates[i] {
                        BlockUpdate::Data(phys, crc) => {
                            if old_data.is_none() {
                                delta.head_blocks += 1;
                            }
                            if !old_owned {
                                delta.head_owned_blocks += 1;
                            }
                            delta.owned_blocks += 1;
                            *groups.entry(phys.group).or_insert(0) += 1;
                            MapValue::Owned { phys, crc }
                        }
                        BlockUpdate::Zero => {
                            if old_data.is_none() {
                                continue; // already reads as zeros
                            }
                            delta.head_blocks -= 1;
                            if old_owned {
                                delta.head_owned_blocks -= 1;
                            }
                            MapValue::Tombstone
                        }
                    };
                    changed = true;
                    // The new version takes the head slot. The version it replaces on this
                    // timeline moves to its history key if a checkpoint or branch point still
                    // sees it, else it is released: an unretained overwrite is one put.
                    if let Some(f) = old
                        && f.timeline == head.id
                    {
                        if tm.retained(f.seq, item_seq) {
                            b.put_cf(map, map_key(head.id, lba, f.seq), f.value.encode());
                        } else {
                            Inner::release_version(
                                &f.value,
                                &mut released,
                                &mut groups,
                                &mut delta,
                            );
                        }
                    }
                    let new = Version {
                        seq: item_seq,
                        value: new_value,
                    };
                    b.put_cf(map, head_key(head.id, lba), new.encode_head());
                    if record_overlay {
                        overlay.insert(
                            lba.0,
                            Found {
                                value: new_value,
                                timeline: head.id,
                                seq: item_seq,
                                owner: new_value.data().map(|_| self.vol.id),
                            },
                        );
                    }
                }
                if changed {
                    seq = item_seq;
                }
                commits.push(Commit { seq, released });
            }
            if seq == tm.head_seq {
                return Ok(commits); // nothing changed
            }
            b.put_cf(
                cf(&inner.db, CF_HEADS),
                crate::codec::u64_key(head.id.0),
                crate::codec::u64_key(seq.0),
            );
            inner.put_group_merges(&mut b, &groups);
            inner.put_counter_merge(&mut b, self.vol.id, &delta);
            fail::fail_point!("snapshotter::commit::before_write", |_| Err(
                Error::Injected("snapshotter::commit::before_write")
            ));
            db::write(&inner.db, b, false)?;
            // The cache takes the new mappings and their versions (in request order: a
            // later request of the group wins, as in the batch). A request that wrote data
            // changed something, so its commit's seq is the one its versions carry.
            let budget = inner.opts.head_cache_bytes;
            for ((lba0, updates), c) in items.iter().zip(&commits) {
                head.cache
                    .store(self.blocks(), *lba0, updates, c.seq, budget);
            }
            fail::fail_point!("snapshotter::commit::after_write");
            tm.head_seq = seq;
            self.vol.counters.lock().add(&delta);
            let empty = inner.apply_groups(&groups);
            if let Some(c) = commits.first_mut() {
                c.released.empty_groups = empty;
            }
            return Ok(commits);
        }
    }

    /// Moves blocks to new addresses holding identical bytes (defragmentation): for each
    /// [`Relocation`], if the head still maps `lba` to `from` (same crc) through a version
    /// of its own timeline that no checkpoint or clone sees, the version now points at `to`
    /// (same seq: readers and accounting see no change) and `from` is released. Versions
    /// a checkpoint or clone sees are left alone (a flattened clone may hold a copy of their
    /// address), and so is a block a write changed since the caller read it. One batch.
    ///
    /// The caller must make the bytes at `to` durable before calling (the new mapping may
    /// reach disk with any later metadata write), and release the `to` of every rejected
    /// move.
    pub fn relocate(&self, moves: &[Relocation]) -> Result<Relocated> {
        for m in moves {
            self.check(m.lba, 1)?;
        }
        let inner = &self.inner;
        loop {
            let head = self.vol.head();
            let tm = head.m.lock();
            if self.vol.is_deleted() {
                return Err(Error::VolumeNotFound(self.vol.name.clone()));
            }
            if !tm.is_head {
                continue; // a restore moved the head
            }
            let keys: Vec<[u8; 24]> = moves
                .iter()
                .map(|m| head_key(head.id, Lba(m.lba)))
                .collect();
            let got = inner
                .db
                .batched_multi_get_cf(cf(&inner.db, CF_MAP), &keys, false);
            let map = cf(&inner.db, CF_MAP);
            let mut b = WriteBatch::default();
            let mut groups: HashMap<u64, i64> = HashMap::new();
            let mut out = Relocated::default();
            for ((m, key), r) in moves.iter().zip(&keys).zip(got) {
                let cur = match r? {
                    Some(v) => Some(Version::decode(crate::codec::HEAD_SLOT, &v)?),
                    None => None,
                };
                let movable = cur.filter(|v| {
                    v.value
                        == MapValue::Owned {
                            phys: m.from,
                            crc: m.crc,
                        }
                        && tm.retention.range(v.seq..).next().is_none()
                });
                let Some(v) = movable else {
                    out.rejected.push(m.to);
                    continue;
                };
                let new = Version {
                    seq: v.seq,
                    value: MapValue::Owned {
                        phys: m.to,
                        crc: m.crc,
                    },
                };
                b.put_cf(map, key, new.encode_head());
                *groups.entry(m.to.group).or_insert(0) += 1;
                *groups.entry(m.from.group).or_insert(0) -= 1;
                out.released.blocks.push(m.from);
                out.moved += 1;
            }
            if out.moved == 0 {
                return Ok(out);
            }
            inner.put_group_merges(&mut b, &groups);
            fail::fail_point!("snapshotter::relocate::before_write", |_| Err(
                Error::Injected("snapshotter::relocate::before_write")
            ));
            db::write(&inner.db, b, false)?;
            for m in moves {
                head.cache.invalidate(self.blocks(), m.lba, 1);
            }
            out.released.empty_groups = inner.apply_groups(&groups);
            return Ok(out);
        }
    }

    /// Resolution with provenance, for tests and diagnostics.
    pub fn lookup_found(&self, lba0: u64, n: usize) -> Result<Vec<Option<Found>>> {
        self.check(lba0, n)?;
        let head = self.vol.head();
        self.inner.resolve(&head, Seq::MAX, lba0, n)
    }
}
