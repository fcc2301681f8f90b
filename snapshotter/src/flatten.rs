//! Flattening: bounding how many timelines a read visits, whatever the history.
//!
//! Each restore or clone adds a timeline whose unwritten blocks read through to its parent.
//! When a new timeline's read depth exceeds `Options::max_read_depth`, the background copies
//! every ancestor-visible entry into it as a `Borrowed` version at seq 0 (below all its own
//! writes), then marks it flattened so reads stop there. Borrowed entries never own bytes:
//! the ancestor that wrote them keeps them alive through this timeline's branch point,
//! which stays in the parent's retention set for as long as this timeline exists.

use crate::catalog::TimelineState;
use crate::codec::{MapValue, Version, decode_map_key, head_key, map_key, map_key_first};
use crate::db::{self, CF_MAP, cf};
use crate::engine::{Inner, Released};
use crate::error::Result;
use crate::ids::{BLOCK_SIZE, Lba, Seq, TimelineId};
use crate::records::TimelineRecord;
use rocksdb::{ReadOptions, WriteBatch};
use std::sync::Arc;
use std::sync::atomic::Ordering;

const FLATTEN_RANGE_BLOCKS: u64 = 4096;

impl Inner {
    pub(crate) fn flatten_timeline(&self, tid: TimelineId) -> Result<Released> {
        let (t, size_bytes) = {
            let cat = self.catalog.read();
            let Some(t) = cat.timeline(tid).cloned() else {
                return Ok(Released::default());
            };
            let Some(v) = cat.by_id.get(&t.volume) else {
                return Ok(Released::default());
            };
            (t, v.size_bytes)
        };
        let Some((parent, branch)) = t.parent.clone() else {
            return Ok(Released::default());
        };
        if t.is_flattened() {
            return Ok(Released::default());
        }
        let blocks = size_bytes / BLOCK_SIZE;
        let map = cf(&self.db, CF_MAP);
        let mut lo = 0;
        while lo < blocks {
            let n = FLATTEN_RANGE_BLOCKS.min(blocks - lo) as usize;
            // Versions visible at the branch point never change: no lock needed.
            let visible = self.resolve(&parent, branch, lo, n)?;
            let tm = t.m.lock();
            if tm.deleted {
                return Ok(Released::default());
            }
            let oldest = self.oldest_own_versions(&t, lo, n)?;
            let mut b = WriteBatch::default();
            for (i, f) in visible.iter().enumerate() {
                let Some(f) = f else { continue };
                let (phys, crc, origin) = match f.value {
                    MapValue::Owned { phys, crc } => (phys, crc, f.timeline),
                    MapValue::Borrowed { phys, crc, origin } => (phys, crc, origin),
                    MapValue::Tombstone => continue,
                };
                let lba = Lba(lo + i as u64);
                let copy = Version {
                    seq: Seq::BASE,
                    value: MapValue::Borrowed { phys, crc, origin },
                };
                match oldest[i] {
                    // The timeline holds nothing of this block: the copy is its newest version.
                    None => b.put_cf(map, head_key(t.id, lba), copy.encode_head()),
                    Some(s) if s == Seq::BASE => {} // copied by an earlier, interrupted run
                    // Own versions exist: readers older than all of them need the copy.
                    Some(s) if tm.retention.range(..s).next().is_some() => {
                        b.put_cf(map, map_key(t.id, lba, Seq::BASE), copy.value.encode())
                    }
                    Some(_) => {}
                }
            }
            fail::fail_point!("snapshotter::flatten::before_write", |_| Err(
                crate::error::Error::Injected("snapshotter::flatten::before_write")
            ));
            db::write(&self.db, b, false)?;
            drop(tm);
            lo += n as u64;
        }
        let tm = t.m.lock();
        if tm.deleted {
            return Ok(Released::default());
        }
        let rec = TimelineRecord {
            id: t.id,
            volume: t.volume,
            parent: t.branch(),
            flattened: true,
        };
        let mut b = WriteBatch::default();
        self.put_timeline(&mut b, &rec);
        db::write(&self.db, b, true)?;
        t.flattened.store(true, Ordering::Release);
        drop(tm);
        tracing::debug!(timeline = tid.0, "flattened");
        Ok(Released::default())
    }

    /// For each block in `[lo, lo + n)`, the seq of the oldest version `t` itself holds.
    fn oldest_own_versions(
        &self,
        t: &Arc<TimelineState>,
        lo: u64,
        n: usize,
    ) -> Result<Vec<Option<Seq>>> {
        let mut out = vec![None; n];
        let mut ro = ReadOptions::default();
        ro.set_total_order_seek(true);
        ro.set_iterate_upper_bound(map_key_first(t.id, Lba(lo + n as u64)).to_vec());
        let mut it = self.db.raw_iterator_cf_opt(cf(&self.db, CF_MAP), ro);
        it.seek(map_key_first(t.id, Lba(lo)));
        while let Some(k) = it.key() {
            let (kt, lba, key_seq) = decode_map_key(k)?;
            if kt != t.id {
                break;
            }
            let v = Version::decode(key_seq, it.value().unwrap_or_default())?;
            // Versions come newest first, so the last one seen per block is the oldest.
            out[(lba.0 - lo) as usize] = Some(v.seq);
            it.next();
        }
        it.status()?;
        Ok(out)
    }
}
