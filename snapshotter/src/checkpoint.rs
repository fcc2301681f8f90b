//! Checkpoints, restore and clone. Each is one small metadata batch: O(1) in the volume
//! size, the data written and the number of existing checkpoints. No data is copied and
//! the block map is not scanned.

use crate::catalog::VolumeState;
use crate::codec::{self, Counters};
use crate::db::{self, cf};
use crate::engine::{Snapshotter, Work, now_ms};
use crate::error::{Error, Result};
use crate::ids::{CheckpointId, Seq, TimelineId, VolumeId};
use crate::records::{BranchPoint, CheckpointKind, CheckpointRecord, TimelineRecord, VolumeRecord};
use crate::volume::VolumeInfo;
use rocksdb::WriteBatch;
use std::sync::Arc;

/// What `checkpoint list` reports.
pub type CheckpointInfo = CheckpointRecord;

impl Snapshotter {
    /// Names the head's current state. The caller makes the data up to the returned
    /// checkpoint durable (flush) before reporting success.
    pub fn create_checkpoint(&self, volume: &str, comment: &str) -> Result<CheckpointInfo> {
        let vs = self.inner.volume(volume)?;
        let mut admin = vs.admin.lock();
        let head = vs.head();
        let tm = head.m.lock();
        let counters = *vs.counters.lock();
        let rec = CheckpointRecord {
            id: CheckpointId(admin.next_checkpoint),
            volume: vs.id,
            timeline: head.id,
            seq: tm.head_seq,
            kind: CheckpointKind::User,
            comment: comment.to_string(),
            created_unix_ms: now_ms(),
            head_blocks: counters.head_blocks,
            head_owned_blocks: counters.head_owned_blocks,
        };
        admin.next_checkpoint += 1;
        let mut b = WriteBatch::default();
        self.inner.put_checkpoint(&mut b, &rec);
        self.inner.put_volume(&mut b, &vs.record(&admin));
        fail::fail_point!("snapshotter::create_checkpoint", |_| {
            admin.next_checkpoint -= 1;
            Err(Error::Injected("snapshotter::create_checkpoint"))
        });
        if let Err(e) = db::write(&self.inner.db, b, true) {
            admin.next_checkpoint -= 1;
            return Err(e);
        }
        drop(tm);
        head.m.lock().add_retention(rec.seq);
        admin.checkpoints.insert(rec.id.0, rec.clone());
        Ok(rec)
    }

    pub fn list_checkpoints(&self, volume: &str) -> Result<Vec<CheckpointInfo>> {
        let vs = self.inner.volume(volume)?;
        let admin = vs.admin.lock();
        Ok(admin.checkpoints.values().cloned().collect())
    }

    pub fn checkpoint(&self, volume: &str, id: CheckpointId) -> Result<CheckpointInfo> {
        let vs = self.inner.volume(volume)?;
        let admin = vs.admin.lock();
        admin
            .checkpoints
            .get(&id.0)
            .cloned()
            .ok_or_else(|| Error::CheckpointNotFound {
                volume: volume.to_string(),
                id,
            })
    }

    /// Forgets a checkpoint. Versions only it kept alive are released by background GC.
    pub fn delete_checkpoint(&self, volume: &str, id: CheckpointId) -> Result<()> {
        let inner = &self.inner;
        let vs = inner.volume(volume)?;
        let mut admin = vs.admin.lock();
        let rec =
            admin
                .checkpoints
                .get(&id.0)
                .cloned()
                .ok_or_else(|| Error::CheckpointNotFound {
                    volume: volume.to_string(),
                    id,
                })?;
        let t = inner
            .catalog
            .read()
            .timeline(rec.timeline)
            .cloned()
            .ok_or(Error::TimelineMissing(rec.timeline))?;
        let mut b = WriteBatch::default();
        b.delete_cf(
            cf(&inner.db, db::CF_CHECKPOINTS),
            codec::checkpoint_key(vs.id.0, id.0),
        );
        inner.schedule(&mut b, Work::Gc(t.id));
        fail::fail_point!("snapshotter::delete_checkpoint", |_| Err(Error::Injected(
            "snapshotter::delete_checkpoint"
        )));
        let mut tm = t.m.lock();
        db::write(&inner.db, b, true)?;
        tm.remove_retention(rec.seq);
        drop(tm);
        admin.checkpoints.remove(&id.0);
        Ok(())
    }

    /// Points the head at a checkpoint: a new timeline branching off it. The replaced head
    /// is kept as an automatic checkpoint (returned), so a restore can itself be undone.
    pub fn restore(&self, volume: &str, id: CheckpointId) -> Result<CheckpointInfo> {
        let inner = &self.inner;
        let mut cat = inner.catalog.write();
        let vs = cat
            .volumes
            .get(volume)
            .cloned()
            .ok_or_else(|| Error::VolumeNotFound(volume.to_string()))?;
        let mut admin = vs.admin.lock();
        let target =
            admin
                .checkpoints
                .get(&id.0)
                .cloned()
                .ok_or_else(|| Error::CheckpointNotFound {
                    volume: volume.to_string(),
                    id,
                })?;
        let old_head = vs.head();
        let source = cat
            .timeline(target.timeline)
            .cloned()
            .ok_or(Error::TimelineMissing(target.timeline))?;
        let new_tid = TimelineId(cat.next_timeline_id);
        cat.next_timeline_id += 1;

        // Lock the old head and the source timeline (they may be the same).
        let (mut old_tm, mut src_tm) = crate::catalog::lock_pair(&old_head, &source);
        let counters = *vs.counters.lock();
        let auto = CheckpointRecord {
            id: CheckpointId(admin.next_checkpoint),
            volume: vs.id,
            timeline: old_head.id,
            seq: old_tm.head_seq,
            kind: CheckpointKind::PreRestore,
            comment: format!("automatic: head before restore to {id}"),
            created_unix_ms: now_ms(),
            head_blocks: counters.head_blocks,
            head_owned_blocks: counters.head_owned_blocks,
        };
        let trec = TimelineRecord {
            id: new_tid,
            volume: vs.id,
            parent: Some(BranchPoint {
                timeline: source.id,
                seq: target.seq,
            }),
            flattened: false,
        };
        let new_counters = Counters {
            head_blocks: target.head_blocks,
            head_owned_blocks: target.head_owned_blocks,
            owned_blocks: counters.owned_blocks,
        };
        let mut vrec = vs.record(&admin);
        vrec.head = new_tid;
        vrec.next_checkpoint += 1;
        let mut b = WriteBatch::default();
        inner.put_ids(&mut b, &cat);
        inner.put_checkpoint(&mut b, &auto);
        inner.put_timeline(&mut b, &trec);
        inner.put_volume(&mut b, &vrec);
        b.put_cf(
            cf(&inner.db, db::CF_VOLSTATS),
            codec::u64_key(vs.id.0),
            new_counters.encode(),
        );
        let depth = source.read_depth() + 1;
        if depth > inner.opts.max_read_depth {
            inner.schedule(&mut b, Work::Flatten(new_tid));
        }
        fail::fail_point!("snapshotter::restore", |_| {
            cat.next_timeline_id -= 1;
            Err(Error::Injected("snapshotter::restore"))
        });
        if let Err(e) = db::write(&inner.db, b, true) {
            cat.next_timeline_id -= 1;
            return Err(e);
        }
        old_tm.is_head = false;
        old_head.cache.clear();
        old_tm.add_retention(auto.seq);
        match src_tm.as_mut() {
            Some(s) => s.add_retention(target.seq),
            None => old_tm.add_retention(target.seq),
        }
        drop(src_tm);
        drop(old_tm);
        let t = Arc::new(crate::catalog::TimelineState {
            id: new_tid,
            volume: vs.id,
            parent: Some((source.clone(), target.seq)),
            flattened: std::sync::atomic::AtomicBool::new(false),
            m: parking_lot::Mutex::new(crate::catalog::TimelineMut {
                is_head: true,
                ..Default::default()
            }),
            cache: Default::default(),
        });
        cat.timelines.insert(new_tid, t.clone());
        *vs.head.write() = t;
        *vs.counters.lock() = new_counters;
        admin.next_checkpoint += 1;
        admin.checkpoints.insert(auto.id.0, auto.clone());
        Ok(auto)
    }

    /// Makes a new, independent volume whose content is a checkpoint of another.
    pub fn clone_volume(
        &self,
        volume: &str,
        id: CheckpointId,
        new_name: &str,
    ) -> Result<VolumeInfo> {
        let inner = &self.inner;
        let mut cat = inner.catalog.write();
        if cat.volumes.contains_key(new_name) {
            return Err(Error::VolumeExists(new_name.to_string()));
        }
        if !crate::volume::valid_name(new_name) {
            return Err(Error::InvalidName(new_name.to_string()));
        }
        let vs: Arc<VolumeState> = cat
            .volumes
            .get(volume)
            .cloned()
            .ok_or_else(|| Error::VolumeNotFound(volume.to_string()))?;
        let admin = vs.admin.lock();
        let cp =
            admin
                .checkpoints
                .get(&id.0)
                .cloned()
                .ok_or_else(|| Error::CheckpointNotFound {
                    volume: volume.to_string(),
                    id,
                })?;
        let source = cat
            .timeline(cp.timeline)
            .cloned()
            .ok_or(Error::TimelineMissing(cp.timeline))?;
        let vid = VolumeId(cat.next_volume_id);
        let tid = TimelineId(cat.next_timeline_id);
        cat.next_volume_id += 1;
        cat.next_timeline_id += 1;
        let rec = VolumeRecord {
            id: vid,
            name: new_name.to_string(),
            size_bytes: vs.size_bytes,
            head: tid,
            next_checkpoint: 1,
            created_unix_ms: now_ms(),
            cloned_from: Some(format!("{volume}@{id}")),
            stream: crate::records::new_stream_id(),
        };
        let trec = TimelineRecord {
            id: tid,
            volume: vid,
            parent: Some(BranchPoint {
                timeline: source.id,
                seq: cp.seq,
            }),
            flattened: false,
        };
        let counters = Counters {
            head_blocks: cp.head_blocks,
            head_owned_blocks: 0,
            owned_blocks: 0,
        };
        let mut b = WriteBatch::default();
        inner.put_ids(&mut b, &cat);
        inner.put_volume(&mut b, &rec);
        inner.put_timeline(&mut b, &trec);
        b.put_cf(
            cf(&inner.db, db::CF_VOLSTATS),
            codec::u64_key(vid.0),
            counters.encode(),
        );
        if source.read_depth() + 1 > inner.opts.max_read_depth {
            inner.schedule(&mut b, Work::Flatten(tid));
        }
        let mut stm = source.m.lock();
        let res = (|| {
            fail::fail_point!("snapshotter::clone", |_| Err(Error::Injected(
                "snapshotter::clone"
            )));
            db::write(&inner.db, b, true)
        })();
        if let Err(e) = res {
            cat.next_volume_id -= 1;
            cat.next_timeline_id -= 1;
            return Err(e);
        }
        stm.add_retention(cp.seq);
        drop(stm);
        drop(admin);
        let nv = inner.install_volume(&mut cat, rec, trec, Some((source, cp.seq)), counters);
        drop(cat);
        Ok(self.info_of(&nv))
    }

    /// The checkpoint's content, for reads of a checkpoint (e.g. a read-only export).
    pub fn checkpoint_reader(&self, volume: &str, id: CheckpointId) -> Result<CheckpointReader> {
        let cp = self.checkpoint(volume, id)?;
        let t = self
            .inner
            .catalog
            .read()
            .timeline(cp.timeline)
            .cloned()
            .ok_or(Error::TimelineMissing(cp.timeline))?;
        Ok(CheckpointReader {
            snap: self.clone(),
            timeline: t,
            seq: cp.seq,
            size_bytes: self.inner.volume(volume)?.size_bytes,
        })
    }
}

/// Reads blocks as a checkpoint saw them.
#[derive(Debug, Clone)]
pub struct CheckpointReader {
    snap: Snapshotter,
    timeline: Arc<crate::catalog::TimelineState>,
    seq: Seq,
    size_bytes: u64,
}

impl CheckpointReader {
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn lookup(&self, lba0: u64, n: usize) -> Result<Vec<crate::map::Mapping>> {
        Ok(self
            .snap
            .inner
            .resolve(&self.timeline, self.seq, lba0, n)?
            .into_iter()
            .map(|f| f.map_or(crate::map::Mapping::Zero, |f| f.mapping()))
            .collect())
    }
}
