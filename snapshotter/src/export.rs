//! Export and import of one volume's metadata: what a manifest in the object store holds,
//! so the volume can be opened on another host.
//!
//! An export lists the volume's record, its checkpoints, its counters, and every timeline
//! its head and checkpoints read (the volume's own, and those of the volumes it was cloned
//! from), each with its head seq and its map entries (read page by page). An import
//! installs all of it under fresh local ids: a timeline of another volume becomes a
//! timeline of no volume (its bytes are shared, not owned), reachable only through the
//! imported volume's branch points.

use crate::catalog::TimelineState;
use crate::codec::{self, Counters, MapValue, Version, decode_map_key, map_key_first};
use crate::db::{self, CF_MAP, cf};
use crate::engine::{Inner, Snapshotter, Work, now_ms};
use crate::error::{Error, Result};
use crate::ids::{Lba, Seq, TimelineId, VolumeId};
use crate::records::{BranchPoint, CheckpointRecord, TimelineRecord, VolumeRecord};
use rocksdb::{ReadOptions, WriteBatch};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Blocks per map page (64 MiB of logical space).
pub const PAGE_BLOCKS: u64 = 16384;

/// Volume ids of timelines that belong to no local volume (imported clone sources).
pub const FOREIGN_VOLUME: VolumeId = VolumeId(0);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineExport {
    pub record: TimelineRecord,
    pub head_seq: Seq,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeExport {
    pub volume: VolumeRecord,
    pub checkpoints: Vec<CheckpointRecord>,
    pub counters: CountersExport,
    /// Parents before children.
    pub timelines: Vec<TimelineExport>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CountersExport {
    pub head_blocks: i64,
    pub head_owned_blocks: i64,
    pub owned_blocks: i64,
}

/// One map entry as exported: block, the seq field of its key (`HEAD_SLOT` for a head
/// slot), and the raw value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryExport {
    pub lba: u64,
    pub key_seq: u64,
    pub value: Vec<u8>,
}

impl Snapshotter {
    /// The volume's catalog for a manifest.
    pub fn export_volume(&self, name: &str) -> Result<VolumeExport> {
        let vs = self.inner.volume(name)?;
        let admin = vs.admin.lock();
        let head = vs.head();
        let mut wanted: BTreeMap<TimelineId, Arc<TimelineState>> = BTreeMap::new();
        let mut add_chain = |t: &Arc<TimelineState>| {
            let mut cur = Some(t.clone());
            while let Some(t) = cur {
                cur = t.parent.as_ref().map(|(p, _)| p.clone());
                wanted.insert(t.id, t);
            }
        };
        add_chain(&head);
        for cp in admin.checkpoints.values() {
            if let Some(t) = self.inner.catalog.read().timeline(cp.timeline).cloned() {
                add_chain(&t);
            }
        }
        let timelines = wanted
            .values()
            .map(|t| TimelineExport {
                record: TimelineRecord {
                    id: t.id,
                    volume: t.volume,
                    parent: t.branch(),
                    flattened: t.is_flattened(),
                },
                head_seq: t.m.lock().head_seq,
            })
            .collect();
        let c = *vs.counters.lock();
        Ok(VolumeExport {
            volume: vs.record(&admin),
            checkpoints: admin.checkpoints.values().cloned().collect(),
            counters: CountersExport {
                head_blocks: c.head_blocks,
                head_owned_blocks: c.head_owned_blocks,
                owned_blocks: c.owned_blocks,
            },
            timelines,
        })
    }

    /// The map entries of `timeline` for blocks `[first, first + PAGE_BLOCKS)`, and the
    /// groups their data lives in.
    pub fn export_page(&self, timeline: TimelineId, first: u64) -> Result<Vec<EntryExport>> {
        let mut ro = ReadOptions::default();
        ro.set_total_order_seek(true);
        ro.set_iterate_upper_bound(map_key_first(timeline, Lba(first + PAGE_BLOCKS)).to_vec());
        let mut it = self
            .inner
            .db
            .raw_iterator_cf_opt(cf(&self.inner.db, CF_MAP), ro);
        it.seek(map_key_first(timeline, Lba(first)));
        let mut out = Vec::new();
        while let Some(k) = it.key() {
            let (t, lba, seq) = decode_map_key(k)?;
            if t != timeline {
                break;
            }
            out.push(EntryExport {
                lba: lba.0,
                key_seq: seq.0,
                value: it.value().unwrap_or_default().to_vec(),
            });
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Which pages of a timeline hold entries (first block of each).
    pub fn export_page_starts(&self, timeline: TimelineId) -> Result<Vec<u64>> {
        let mut starts = Vec::new();
        let mut ro = ReadOptions::default();
        ro.set_total_order_seek(true);
        ro.set_iterate_upper_bound(map_key_first(TimelineId(timeline.0 + 1), Lba(0)).to_vec());
        let mut it = self
            .inner
            .db
            .raw_iterator_cf_opt(cf(&self.inner.db, CF_MAP), ro);
        it.seek(map_key_first(timeline, Lba(0)));
        while let Some(k) = it.key() {
            let (_, lba, _) = decode_map_key(k)?;
            let page = lba.0 / PAGE_BLOCKS * PAGE_BLOCKS;
            starts.push(page);
            // Jump to the next page.
            match page.checked_add(PAGE_BLOCKS) {
                Some(next) => it.seek(map_key_first(timeline, Lba(next))),
                None => break,
            }
        }
        it.status()?;
        Ok(starts)
    }

    /// Installs an exported volume under `name` with fresh local ids. `entries` yields the
    /// map entries of each exported timeline (by its exported id).
    pub fn import_volume(
        &self,
        name: &str,
        export: &VolumeExport,
        entries: &mut dyn FnMut(TimelineId) -> Result<Vec<EntryExport>>,
    ) -> Result<crate::volume::VolumeInfo> {
        if !crate::volume::valid_name(name) {
            return Err(Error::InvalidName(name.to_string()));
        }
        let inner = &self.inner;
        // Allocate ids and check the name under the catalog lock, then write outside it.
        let (vid, ids) = {
            let mut cat = inner.catalog.write();
            if cat.volumes.contains_key(name) {
                return Err(Error::VolumeExists(name.to_string()));
            }
            let vid = VolumeId(cat.next_volume_id);
            cat.next_volume_id += 1;
            let mut ids: HashMap<TimelineId, TimelineId> = HashMap::new();
            for t in &export.timelines {
                ids.insert(t.record.id, TimelineId(cat.next_timeline_id));
                cat.next_timeline_id += 1;
            }
            let mut b = WriteBatch::default();
            inner.put_ids(&mut b, &cat);
            db::write(&inner.db, b, true)?;
            (vid, ids)
        };
        let map_id = |t: TimelineId| -> Result<TimelineId> {
            ids.get(&t)
                .copied()
                .ok_or_else(|| Error::Corrupt(format!("export refers to unknown timeline {t:?}")))
        };
        let old_vid = export.volume.id;
        // Map entries, timeline by timeline, in bounded batches.
        let mut groups: HashMap<u64, i64> = HashMap::new();
        for t in &export.timelines {
            let new_t = map_id(t.record.id)?;
            let mut b = WriteBatch::default();
            let mut n = 0;
            for e in entries(t.record.id)? {
                let v = Version::decode(Seq(e.key_seq), &e.value)?;
                let value = match v.value {
                    MapValue::Borrowed { phys, crc, origin } => MapValue::Borrowed {
                        phys,
                        crc,
                        origin: map_id(origin)?,
                    },
                    other => other,
                };
                if let MapValue::Owned { phys, .. } = value {
                    *groups.entry(phys.group).or_insert(0) += 1;
                }
                let key = codec::map_key(new_t, Lba(e.lba), Seq(e.key_seq));
                let bytes = if e.key_seq == codec::HEAD_SLOT.0 {
                    Version { seq: v.seq, value }.encode_head()
                } else {
                    value.encode()
                };
                b.put_cf(cf(&inner.db, CF_MAP), key, bytes);
                n += 1;
                if n % 65536 == 0 {
                    db::write(&inner.db, std::mem::take(&mut b), false)?;
                }
            }
            db::write(&inner.db, b, false)?;
        }
        // Catalog records and counters in one batch.
        let mut b = WriteBatch::default();
        let mut trecs = Vec::new();
        for t in &export.timelines {
            let rec = TimelineRecord {
                id: map_id(t.record.id)?,
                volume: if t.record.volume == old_vid {
                    vid
                } else {
                    FOREIGN_VOLUME
                },
                parent: match t.record.parent {
                    Some(bp) => Some(BranchPoint {
                        timeline: map_id(bp.timeline)?,
                        seq: bp.seq,
                    }),
                    None => None,
                },
                flattened: t.record.flattened,
            };
            inner.put_timeline(&mut b, &rec);
            b.put_cf(
                cf(&inner.db, db::CF_HEADS),
                codec::u64_key(rec.id.0),
                codec::u64_key(t.head_seq.0),
            );
            trecs.push((rec, t.head_seq));
        }
        let mut vrec = export.volume.clone();
        vrec.id = vid;
        vrec.name = name.to_string();
        vrec.head = map_id(export.volume.head)?;
        inner.put_volume(&mut b, &vrec);
        let mut cps = Vec::new();
        for cp in &export.checkpoints {
            let mut c = cp.clone();
            c.volume = vid;
            c.timeline = map_id(cp.timeline)?;
            inner.put_checkpoint(&mut b, &c);
            cps.push(c);
        }
        let counters = Counters {
            head_blocks: export.counters.head_blocks,
            head_owned_blocks: export.counters.head_owned_blocks,
            owned_blocks: export.counters.owned_blocks,
        };
        b.put_cf(
            cf(&inner.db, db::CF_VOLSTATS),
            codec::u64_key(vid.0),
            counters.encode(),
        );
        inner.put_group_merges(&mut b, &groups);
        for (rec, _) in &trecs {
            // Imported timelines may need flattening like any other.
            if !rec.flattened && rec.parent.is_some() {
                inner.schedule(&mut b, Work::Flatten(rec.id));
            }
        }
        db::write(&inner.db, b, true)?;
        inner.apply_groups(&groups);
        let info = inner.install_import(vid, vrec, &trecs, cps, counters)?;
        tracing::info!(
            volume = name,
            timelines = trecs.len(),
            at_ms = now_ms(),
            "imported"
        );
        Ok(self.info_of(&info))
    }
}

impl Inner {
    /// Adds an imported volume and its timelines to the catalog (records already written).
    fn install_import(
        &self,
        vid: VolumeId,
        vrec: VolumeRecord,
        timelines: &[(TimelineRecord, Seq)],
        checkpoints: Vec<CheckpointRecord>,
        counters: Counters,
    ) -> Result<Arc<crate::catalog::VolumeState>> {
        let mut cat = self.catalog.write();
        for (rec, head_seq) in timelines {
            let parent = match rec.parent {
                Some(bp) => {
                    let p = cat
                        .timeline(bp.timeline)
                        .cloned()
                        .ok_or(Error::TimelineMissing(bp.timeline))?;
                    p.m.lock().add_retention(bp.seq);
                    Some((p, bp.seq))
                }
                None => None,
            };
            let t = TimelineState {
                id: rec.id,
                volume: rec.volume,
                parent,
                flattened: std::sync::atomic::AtomicBool::new(rec.flattened),
                m: parking_lot::Mutex::new(crate::catalog::TimelineMut {
                    head_seq: *head_seq,
                    is_head: rec.id == vrec.head,
                    ..Default::default()
                }),
                cache: Default::default(),
            };
            cat.timelines.insert(rec.id, Arc::new(t));
        }
        for cp in &checkpoints {
            if let Some(t) = cat.timeline(cp.timeline) {
                t.m.lock().add_retention(cp.seq);
            }
        }
        let head = cat
            .timeline(vrec.head)
            .cloned()
            .ok_or(Error::TimelineMissing(vrec.head))?;
        let vs = Arc::new(crate::catalog::VolumeState {
            id: vid,
            name: vrec.name.clone(),
            size_bytes: vrec.size_bytes,
            created_unix_ms: vrec.created_unix_ms,
            cloned_from: vrec.cloned_from.clone(),
            stream: vrec.stream,
            head: parking_lot::RwLock::new(head),
            admin: parking_lot::Mutex::new(crate::catalog::VolumeAdmin {
                next_checkpoint: vrec.next_checkpoint,
                checkpoints: checkpoints.into_iter().map(|c| (c.id.0, c)).collect(),
            }),
            counters: parking_lot::Mutex::new(counters),
            deleted: std::sync::atomic::AtomicBool::new(false),
        });
        cat.by_id.insert(vid, vs.clone());
        cat.volumes.insert(vrec.name, vs.clone());
        Ok(vs)
    }
}
