//! The in-memory catalog: volumes, timelines and their retention points, loaded from
//! RocksDB at open and kept in step with every batch written.
//!
//! Lock order (deadlock freedom): `Inner::catalog` -> `VolumeState::admin` ->
//! `TimelineState::m` (several timelines: ascending id) -> `Inner::groups`.
//! The data path takes only the head timeline's lock.

use crate::codec::Counters;
use crate::ids::{Seq, TimelineId, VolumeId};
use crate::records::{BranchPoint, CheckpointRecord, VolumeRecord};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub(crate) struct Catalog {
    pub volumes: HashMap<String, Arc<VolumeState>>,
    pub by_id: HashMap<VolumeId, Arc<VolumeState>>,
    pub timelines: HashMap<TimelineId, Arc<TimelineState>>,
    pub next_volume_id: u64,
    pub next_timeline_id: u64,
}

impl Catalog {
    pub fn timeline(&self, id: TimelineId) -> Option<&Arc<TimelineState>> {
        self.timelines.get(&id)
    }
}

#[derive(Debug)]
pub(crate) struct VolumeState {
    pub id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    pub created_unix_ms: u64,
    pub cloned_from: Option<String>,
    pub stream: u64,
    /// The timeline receiving writes. Changed only by restore (holding `admin` and the old
    /// head's lock).
    pub head: RwLock<Arc<TimelineState>>,
    pub admin: Mutex<VolumeAdmin>,
    pub counters: Mutex<Counters>,
    pub deleted: AtomicBool,
}

#[derive(Debug)]
pub(crate) struct VolumeAdmin {
    pub next_checkpoint: u64,
    pub checkpoints: BTreeMap<u64, CheckpointRecord>,
}

impl VolumeState {
    pub fn head(&self) -> Arc<TimelineState> {
        self.head.read().clone()
    }

    pub fn record(&self, admin: &VolumeAdmin) -> VolumeRecord {
        VolumeRecord {
            id: self.id,
            name: self.name.clone(),
            size_bytes: self.size_bytes,
            head: self.head.read().id,
            next_checkpoint: admin.next_checkpoint,
            created_unix_ms: self.created_unix_ms,
            cloned_from: self.cloned_from.clone(),
            stream: self.stream,
        }
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }
}

#[derive(Debug)]
pub(crate) struct TimelineState {
    pub id: TimelineId,
    pub volume: VolumeId,
    pub parent: Option<(Arc<TimelineState>, Seq)>,
    /// Reads stop here (flattening copied every ancestor-visible entry in).
    pub flattened: AtomicBool,
    pub m: Mutex<TimelineMut>,
    /// What the head shows per block, while this timeline is a head (see
    /// [`crate::headcache`]).
    pub cache: crate::headcache::HeadCache,
}

#[derive(Debug, Default)]
pub(crate) struct TimelineMut {
    /// Last committed seq.
    pub head_seq: Seq,
    /// Retention points: checkpoints and child branch points, with multiplicity.
    pub retention: BTreeMap<Seq, u32>,
    /// A volume's head: its newest versions are live whatever the retention points say.
    pub is_head: bool,
    pub deleted: bool,
}

impl TimelineMut {
    /// Is any reader positioned in `[lo, hi)`? Such a reader still sees the version written
    /// at `lo` that a version at `hi` superseded.
    pub fn retained(&self, lo: Seq, hi: Seq) -> bool {
        lo < hi && self.retention.range(lo..hi).next().is_some()
    }

    /// Is any reader positioned at or after `lo` (the newest version of a block)?
    pub fn retained_from(&self, lo: Seq) -> bool {
        self.is_head || self.retention.range(lo..).next().is_some()
    }

    pub fn add_retention(&mut self, seq: Seq) {
        *self.retention.entry(seq).or_insert(0) += 1;
    }

    pub fn remove_retention(&mut self, seq: Seq) {
        if let Some(n) = self.retention.get_mut(&seq) {
            *n -= 1;
            if *n == 0 {
                self.retention.remove(&seq);
            }
        }
    }

    /// Nothing reads this timeline any more: it can be deleted once its entries are gone.
    pub fn unreferenced(&self) -> bool {
        !self.is_head && self.retention.is_empty()
    }
}

impl TimelineState {
    pub fn branch(&self) -> Option<BranchPoint> {
        self.parent.as_ref().map(|(p, s)| BranchPoint {
            timeline: p.id,
            seq: *s,
        })
    }

    pub fn is_flattened(&self) -> bool {
        self.flattened.load(Ordering::Acquire)
    }

    /// How many timelines a read of a block nobody wrote visits, this one included.
    pub fn read_depth(&self) -> usize {
        let mut depth = 1;
        let mut cur = self;
        while !cur.is_flattened() {
            match &cur.parent {
                Some((p, _)) => {
                    depth += 1;
                    cur = p;
                }
                None => break,
            }
        }
        depth
    }
}

/// Locks two timelines in ascending id order and returns the guards in argument order
/// (`None` for the second when both are the same timeline).
pub(crate) fn lock_pair<'a>(
    a: &'a TimelineState,
    b: &'a TimelineState,
) -> (
    parking_lot::MutexGuard<'a, TimelineMut>,
    Option<parking_lot::MutexGuard<'a, TimelineMut>>,
) {
    if a.id == b.id {
        (a.m.lock(), None)
    } else if a.id < b.id {
        let ga = a.m.lock();
        (ga, Some(b.m.lock()))
    } else {
        let gb = b.m.lock();
        (a.m.lock(), Some(gb))
    }
}
