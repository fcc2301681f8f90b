//! `Snapshotter`: opening the database, loading the catalog, and the shared state every
//! operation works on.

use crate::catalog::{Catalog, TimelineMut, TimelineState, VolumeAdmin, VolumeState};
use crate::codec::{self, Counters, decode_checkpoint_key, decode_i64, decode_u64_key, u64_key};
use crate::db::{self, cf};
use crate::error::{Error, Result};
use crate::ids::{PhysBlock, Seq, TimelineId, VolumeId};
use crate::records::{self, CheckpointRecord, TimelineRecord, VolumeRecord};
use parking_lot::{Mutex, RwLock};
use rocksdb::{DB, IteratorMode, WriteBatch};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// Bytes (by physical address) that no version references any more, and groups whose last
/// reference went away. The caller must not reuse or punch them before the batch that
/// released them is durable (`Snapshotter::sync`), and not while a read that resolved them
/// before the release may still be reading.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Released {
    pub blocks: Vec<PhysBlock>,
    pub empty_groups: Vec<u64>,
}

impl Released {
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.empty_groups.is_empty()
    }

    pub fn extend(&mut self, other: Released) {
        self.blocks.extend(other.blocks);
        self.empty_groups.extend(other.empty_groups);
    }
}

/// Background work the snapshotter owes: persisted as markers so a crash resumes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Work {
    /// Drop versions no reader can see any more (after a retention point went away).
    Gc(TimelineId),
    /// Copy ancestor-visible entries in so reads stop walking the chain.
    Flatten(TimelineId),
}

impl Work {
    pub fn marker(&self) -> Vec<u8> {
        let (prefix, t) = match self {
            Work::Gc(t) => (db::META_GC_PREFIX, t),
            Work::Flatten(t) => (db::META_FLATTEN_PREFIX, t),
        };
        let mut k = prefix.to_vec();
        k.extend_from_slice(&u64_key(t.0));
        k
    }
}

/// Tunables.
#[derive(Debug, Clone)]
pub struct Options {
    /// RocksDB block cache.
    pub cache_bytes: usize,
    /// A timeline whose reads would visit more timelines than this gets flattened.
    pub max_read_depth: usize,
    /// Per volume: memory for the in-memory copy of the head's block mappings in front of
    /// RocksDB on the read path (16 bytes per cached 4 KiB block); 0 disables it.
    pub head_cache_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            cache_bytes: 256 << 20,
            max_read_depth: 4,
            head_cache_bytes: 16 << 20,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub db: DB,
    pub catalog: RwLock<Catalog>,
    /// Live references per group (mirrors CF_GROUPS).
    pub groups: Mutex<HashMap<u64, i64>>,
    pub work: Mutex<BTreeSet<Work>>,
    pub opts: Options,
}

/// Volume metadata engine. Cheap to clone; all clones share one database.
#[derive(Debug, Clone)]
pub struct Snapshotter {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Snapshotter {
    pub fn open(path: &Path, opts: Options) -> Result<Snapshotter> {
        let db = db::open(path, opts.cache_bytes)?;
        match db.get_cf(cf(&db, db::CF_META), db::META_FORMAT)? {
            None => {
                let mut b = WriteBatch::default();
                b.put_cf(cf(&db, db::CF_META), db::META_FORMAT, db::FORMAT_VERSION);
                db::write(&db, b, true)?;
            }
            Some(v) if v == db::FORMAT_VERSION => {}
            Some(v) => {
                return Err(Error::Corrupt(format!(
                    "metadata format {:?} is not supported (expected {:?})",
                    String::from_utf8_lossy(&v),
                    String::from_utf8_lossy(db::FORMAT_VERSION)
                )));
            }
        }
        let (catalog, work) = load(&db)?;
        let groups = load_groups(&db)?;
        Ok(Snapshotter {
            inner: Arc::new(Inner {
                db,
                catalog: RwLock::new(catalog),
                groups: Mutex::new(groups),
                work: Mutex::new(work),
                opts,
            }),
        })
    }

    /// Makes every batch written so far durable (fsync of RocksDB's WAL). Callers make the
    /// data the batches point at durable first.
    pub fn sync(&self) -> Result<()> {
        fail::fail_point!("snapshotter::sync", |_| Err(Error::Injected(
            "snapshotter::sync"
        )));
        self.inner.db.flush_wal(true)?;
        Ok(())
    }

    /// Live references to every group that has any.
    pub fn group_refs(&self) -> HashMap<u64, i64> {
        self.inner
            .groups
            .lock()
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(g, n)| (*g, *n))
            .collect()
    }

    pub fn group_ref(&self, group: u64) -> i64 {
        self.inner.groups.lock().get(&group).copied().unwrap_or(0)
    }
}

impl Inner {
    /// Applies group reference deltas after their batch was written; returns the groups that
    /// reached zero.
    pub(crate) fn apply_groups(&self, deltas: &HashMap<u64, i64>) -> Vec<u64> {
        let mut groups = self.groups.lock();
        let mut empty = Vec::new();
        for (g, d) in deltas {
            let n = groups.entry(*g).or_insert(0);
            *n += d;
            if *n <= 0 {
                groups.remove(g);
                if *d < 0 {
                    empty.push(*g);
                }
            }
        }
        empty
    }

    pub(crate) fn put_group_merges(&self, b: &mut WriteBatch, deltas: &HashMap<u64, i64>) {
        for (g, d) in deltas {
            if *d != 0 {
                b.merge_cf(
                    cf(&self.db, db::CF_GROUPS),
                    u64_key(*g),
                    codec::encode_i64(*d),
                );
            }
        }
    }

    pub(crate) fn put_counter_merge(&self, b: &mut WriteBatch, vol: VolumeId, d: &Counters) {
        if !d.is_zero() {
            b.merge_cf(cf(&self.db, db::CF_VOLSTATS), u64_key(vol.0), d.encode());
        }
    }

    pub(crate) fn put_volume(&self, b: &mut WriteBatch, r: &VolumeRecord) {
        b.put_cf(
            cf(&self.db, db::CF_VOLUMES),
            r.name.as_bytes(),
            records::encode(r),
        );
    }

    pub(crate) fn put_timeline(&self, b: &mut WriteBatch, r: &TimelineRecord) {
        b.put_cf(
            cf(&self.db, db::CF_TIMELINES),
            u64_key(r.id.0),
            records::encode(r),
        );
    }

    pub(crate) fn put_checkpoint(&self, b: &mut WriteBatch, r: &CheckpointRecord) {
        b.put_cf(
            cf(&self.db, db::CF_CHECKPOINTS),
            codec::checkpoint_key(r.volume.0, r.id.0),
            records::encode(r),
        );
    }

    pub(crate) fn put_ids(&self, b: &mut WriteBatch, c: &Catalog) {
        let meta = cf(&self.db, db::CF_META);
        b.put_cf(meta, db::META_NEXT_VOLUME, u64_key(c.next_volume_id));
        b.put_cf(meta, db::META_NEXT_TIMELINE, u64_key(c.next_timeline_id));
    }

    /// Queues background work; the marker goes into `b` so it survives a crash.
    pub(crate) fn schedule(&self, b: &mut WriteBatch, w: Work) {
        b.put_cf(cf(&self.db, db::CF_META), w.marker(), b"");
        self.work.lock().insert(w);
    }
}

fn load_groups(db: &DB) -> Result<HashMap<u64, i64>> {
    let mut groups = HashMap::new();
    for kv in db.iterator_cf(cf(db, db::CF_GROUPS), IteratorMode::Start) {
        let (k, v) = kv?;
        let n = decode_i64(&v)?;
        if n > 0 {
            groups.insert(decode_u64_key(&k)?, n);
        }
    }
    Ok(groups)
}

fn load(db: &DB) -> Result<(Catalog, BTreeSet<Work>)> {
    let meta = cf(db, db::CF_META);
    let get_u64 = |k: &[u8]| -> Result<u64> {
        match db.get_cf(meta, k)? {
            Some(v) => decode_u64_key(&v),
            None => Ok(1),
        }
    };
    let mut cat = Catalog {
        next_volume_id: get_u64(db::META_NEXT_VOLUME)?,
        next_timeline_id: get_u64(db::META_NEXT_TIMELINE)?,
        ..Default::default()
    };

    // Timelines: parents have smaller ids than their children (ids only grow), so one
    // ascending pass can link each to its parent.
    let mut heads: HashMap<TimelineId, Seq> = HashMap::new();
    for kv in db.iterator_cf(cf(db, db::CF_HEADS), IteratorMode::Start) {
        let (k, v) = kv?;
        heads.insert(TimelineId(decode_u64_key(&k)?), Seq(decode_u64_key(&v)?));
    }
    for kv in db.iterator_cf(cf(db, db::CF_TIMELINES), IteratorMode::Start) {
        let (_, v) = kv?;
        let r: TimelineRecord = records::decode("timeline", &v)?;
        let parent = match r.parent {
            Some(bp) => {
                let p = cat
                    .timelines
                    .get(&bp.timeline)
                    .ok_or(Error::TimelineMissing(bp.timeline))?
                    .clone();
                p.m.lock().add_retention(bp.seq);
                Some((p, bp.seq))
            }
            None => None,
        };
        let t = TimelineState {
            id: r.id,
            volume: r.volume,
            parent,
            flattened: AtomicBool::new(r.flattened),
            m: parking_lot::Mutex::new(TimelineMut {
                head_seq: heads.get(&r.id).copied().unwrap_or_default(),
                ..Default::default()
            }),
            cache: Default::default(),
        };
        cat.timelines.insert(r.id, Arc::new(t));
    }

    let mut checkpoints: HashMap<VolumeId, BTreeMap<u64, CheckpointRecord>> = HashMap::new();
    for kv in db.iterator_cf(cf(db, db::CF_CHECKPOINTS), IteratorMode::Start) {
        let (k, v) = kv?;
        let (vol, num) = decode_checkpoint_key(&k)?;
        let r: CheckpointRecord = records::decode("checkpoint", &v)?;
        let t = cat
            .timelines
            .get(&r.timeline)
            .ok_or(Error::TimelineMissing(r.timeline))?;
        t.m.lock().add_retention(r.seq);
        checkpoints.entry(VolumeId(vol)).or_default().insert(num, r);
    }

    // One pass, not a lookup per volume: the family's memtable is a vector, which sorts a
    // copy of itself for every point lookup.
    let mut volstats: HashMap<u64, Counters> = HashMap::new();
    for kv in db.iterator_cf(cf(db, db::CF_VOLSTATS), IteratorMode::Start) {
        let (k, v) = kv?;
        volstats.insert(decode_u64_key(&k)?, Counters::decode(&v)?);
    }
    for kv in db.iterator_cf(cf(db, db::CF_VOLUMES), IteratorMode::Start) {
        let (_, v) = kv?;
        let r: VolumeRecord = records::decode("volume", &v)?;
        let head = cat
            .timelines
            .get(&r.head)
            .ok_or(Error::TimelineMissing(r.head))?
            .clone();
        head.m.lock().is_head = true;
        let counters = volstats.remove(&r.id.0).unwrap_or_default();
        let vs = Arc::new(VolumeState {
            id: r.id,
            name: r.name.clone(),
            size_bytes: r.size_bytes,
            created_unix_ms: r.created_unix_ms,
            cloned_from: r.cloned_from.clone(),
            stream: r.stream,
            head: RwLock::new(head),
            admin: parking_lot::Mutex::new(VolumeAdmin {
                next_checkpoint: r.next_checkpoint,
                checkpoints: checkpoints.remove(&r.id).unwrap_or_default(),
            }),
            counters: parking_lot::Mutex::new(counters),
            deleted: AtomicBool::new(false),
        });
        cat.by_id.insert(r.id, vs.clone());
        cat.volumes.insert(r.name, vs);
    }
    if let Some(orphans) = checkpoints.keys().next() {
        return Err(Error::Corrupt(format!(
            "checkpoints of unknown volume {orphans:?}"
        )));
    }

    let mut work = BTreeSet::new();
    for (prefix, gc) in [(db::META_GC_PREFIX, true), (db::META_FLATTEN_PREFIX, false)] {
        for kv in db.prefix_iterator_cf(meta, prefix) {
            let (k, _) = kv?;
            if !k.starts_with(prefix) {
                break;
            }
            let t = TimelineId(decode_u64_key(&k[prefix.len()..])?);
            work.insert(if gc { Work::Gc(t) } else { Work::Flatten(t) });
        }
    }
    Ok((cat, work))
}
