//! The read side of the block map: resolving which version of each block a reader sees.
//!
//! A reader is positioned at (timeline, limit). For each block it takes the newest version
//! with seq <= limit on that timeline; blocks the timeline never wrote continue at the
//! parent, limited to the branch seq, and so on until a flattened or root timeline. A
//! tombstone ends the walk (the block reads as zeros).

use crate::catalog::TimelineState;
use crate::codec::{
    HEAD_SLOT, MapValue, Version, decode_map_key, head_key, map_key, map_key_first,
};
use crate::db::{CF_MAP, cf};
use crate::engine::Inner;
use crate::error::Result;
use crate::ids::{Lba, PhysBlock, Seq, TimelineId, VolumeId};
use rocksdb::ReadOptions;
use std::sync::Arc;

/// The version of one block a reader sees, and where it was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub value: MapValue,
    pub timeline: TimelineId,
    pub seq: Seq,
    /// The volume that owns (pays for) the bytes; `None` for tombstones.
    pub owner: Option<VolumeId>,
}

/// What a read of one block returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Never written, discarded or zeroed.
    Zero,
    /// Stored bytes and their crc32c.
    Data { phys: PhysBlock, crc: u32 },
}

impl Found {
    /// Timeline `t`'s own head-slot version `seq` of a block holding data at `phys`.
    pub(crate) fn own_head(t: &TimelineState, phys: PhysBlock, crc: u32, seq: Seq) -> Found {
        let value = MapValue::Owned { phys, crc };
        Found {
            value,
            timeline: t.id,
            seq,
            owner: owner_of(t, &value),
        }
    }

    pub fn mapping(&self) -> Mapping {
        match self.value.data() {
            Some((phys, crc)) => Mapping::Data { phys, crc },
            None => Mapping::Zero,
        }
    }
}

/// From this many blocks on, [`Inner::head_versions`] scans instead of looking up each.
const HEAD_SCAN_MIN_BLOCKS: usize = 16;

impl Inner {
    /// Resolves blocks `[lba0, lba0 + n)` for a reader at (`start`, `limit`).
    /// `None` means no version is visible anywhere on the chain.
    pub(crate) fn resolve(
        &self,
        start: &Arc<TimelineState>,
        limit: Seq,
        lba0: u64,
        n: usize,
    ) -> Result<Vec<Option<Found>>> {
        let mut out: Vec<Option<Found>> = vec![None; n];
        let mut unresolved = n;
        let mut level: Option<(&Arc<TimelineState>, Seq)> = Some((start, limit));
        while let Some((t, lim)) = level {
            unresolved -= self.scan_level(t, lim, lba0, &mut out)?;
            if unresolved == 0 || t.is_flattened() {
                break;
            }
            level = t.parent.as_ref().map(|(p, s)| (p, *s));
        }
        Ok(out)
    }

    /// The head slots of blocks `[lba0, lba0 + n)` on `t`: each block's newest version on
    /// `t`, or `None` if `t` holds no version of it. A few blocks: batched point lookups
    /// (bloom-filtered); a longer range: one scan, which costs one seek per sorted run
    /// instead of one lookup per block and level (a 1 MiB overwrite: 256 blocks).
    pub(crate) fn head_versions(
        &self,
        t: &TimelineState,
        lba0: u64,
        n: usize,
    ) -> Result<Vec<Option<Found>>> {
        if n >= HEAD_SCAN_MIN_BLOCKS {
            return self.scan_head_slots(t, lba0, n);
        }
        let keys: Vec<[u8; 24]> = (0..n as u64)
            .map(|i| head_key(t.id, Lba(lba0 + i)))
            .collect();
        let got = self
            .db
            .batched_multi_get_cf(cf(&self.db, CF_MAP), &keys, true);
        got.into_iter()
            .map(|r| {
                let Some(v) = r? else { return Ok(None) };
                let ver = Version::decode(HEAD_SLOT, &v)?;
                Ok(Some(Found {
                    value: ver.value,
                    timeline: t.id,
                    seq: ver.seq,
                    owner: owner_of(t, &ver.value),
                }))
            })
            .collect()
    }

    fn scan_head_slots(
        &self,
        t: &TimelineState,
        lba0: u64,
        n: usize,
    ) -> Result<Vec<Option<Found>>> {
        let mut out: Vec<Option<Found>> = vec![None; n];
        let end = lba0 + n as u64;
        let mut ro = ReadOptions::default();
        ro.set_total_order_seek(true);
        ro.set_iterate_upper_bound(map_key_first(t.id, Lba(end)).to_vec());
        let mut it = self.db.raw_iterator_cf_opt(cf(&self.db, CF_MAP), ro);
        it.seek(head_key(t.id, Lba(lba0)));
        while let Some(key) = it.key() {
            let (kt, lba, kseq) = decode_map_key(key)?;
            if kt != t.id || lba.0 < lba0 || lba.0 >= end {
                break;
            }
            if kseq != HEAD_SLOT {
                // History of a block (kept for a checkpoint or a branch): skip it all.
                if lba.0 + 1 >= end {
                    break;
                }
                it.seek(head_key(t.id, Lba(lba.0 + 1)));
                continue;
            }
            if let Some(v) = it.value() {
                let ver = Version::decode(HEAD_SLOT, v)?;
                out[(lba.0 - lba0) as usize] = Some(Found {
                    value: ver.value,
                    timeline: t.id,
                    seq: ver.seq,
                    owner: owner_of(t, &ver.value),
                });
            }
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Fills the still-unresolved slots of `out` from timeline `t` at `lim`; returns how
    /// many it resolved.
    fn scan_level(
        &self,
        t: &TimelineState,
        lim: Seq,
        lba0: u64,
        out: &mut [Option<Found>],
    ) -> Result<usize> {
        let n = out.len();
        let Some(first) = out.iter().position(Option::is_none) else {
            return Ok(0);
        };
        if n == 1 {
            return self.point_level(t, lim, lba0, out);
        }
        let mut ro = ReadOptions::default();
        ro.set_total_order_seek(true);
        ro.set_iterate_upper_bound(map_key_first(t.id, Lba(lba0 + n as u64)).to_vec());
        let mut it = self.db.raw_iterator_cf_opt(cf(&self.db, CF_MAP), ro);
        it.seek(head_key(t.id, Lba(lba0 + first as u64)));
        let mut resolved = 0;
        while let Some(key) = it.key() {
            let (kt, lba, kseq) = decode_map_key(key)?;
            if kt != t.id || lba.0 < lba0 || lba.0 >= lba0 + n as u64 {
                break;
            }
            let idx = (lba.0 - lba0) as usize;
            if out[idx].is_some() {
                // Older version of a block already decided: jump to the next open slot.
                match out[idx + 1..].iter().position(Option::is_none) {
                    Some(j) => it.seek(head_key(t.id, Lba(lba0 + (idx + 1 + j) as u64))),
                    None => break,
                }
                continue;
            }
            let ver = Version::decode(kseq, it.value().unwrap_or_default())?;
            if ver.seq > lim {
                // Newer than the reader: the first history version at or below `lim`.
                it.seek(map_key(t.id, lba, lim));
                continue;
            }
            out[idx] = Some(Found {
                value: ver.value,
                timeline: t.id,
                seq: ver.seq,
                owner: owner_of(t, &ver.value),
            });
            resolved += 1;
            it.next();
        }
        it.status()?;
        Ok(resolved)
    }

    /// One block: a point lookup of its head slot; history only for older readers.
    fn point_level(
        &self,
        t: &TimelineState,
        lim: Seq,
        lba: u64,
        out: &mut [Option<Found>],
    ) -> Result<usize> {
        let map = cf(&self.db, CF_MAP);
        let Some(v) = self.db.get_pinned_cf(map, head_key(t.id, Lba(lba)))? else {
            return Ok(0); // the timeline holds no version of this block
        };
        let mut ver = Version::decode(HEAD_SLOT, &v)?;
        if ver.seq > lim {
            let mut ro = ReadOptions::default();
            ro.set_prefix_same_as_start(true);
            let mut it = self.db.raw_iterator_cf_opt(map, ro);
            it.seek(map_key(t.id, Lba(lba), lim));
            let Some(key) = it.key() else {
                it.status()?;
                return Ok(0);
            };
            let (kt, klba, kseq) = decode_map_key(key)?;
            if kt != t.id || klba.0 != lba {
                return Ok(0);
            }
            ver = Version::decode(kseq, it.value().unwrap_or_default())?;
        }
        out[0] = Some(Found {
            value: ver.value,
            timeline: t.id,
            seq: ver.seq,
            owner: owner_of(t, &ver.value),
        });
        Ok(1)
    }
}

/// The volume owning the bytes of `value` found on `t`. A borrowed entry's origin is always
/// one of `t`'s ancestors (flattening copies from the chain), so no catalog lookup is needed.
fn owner_of(t: &TimelineState, value: &MapValue) -> Option<VolumeId> {
    match value {
        MapValue::Owned { .. } => Some(t.volume),
        MapValue::Tombstone => None,
        MapValue::Borrowed { origin, .. } => {
            let mut cur = t.parent.as_ref();
            while let Some((p, _)) = cur {
                if p.id == *origin {
                    return Some(p.volume);
                }
                cur = p.parent.as_ref();
            }
            None
        }
    }
}
