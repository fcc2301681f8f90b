//! Garbage collection of versions no reader can see any more, and deletion of timelines
//! nothing reads. Runs in the background after a checkpoint or volume is deleted.
//!
//! A version `v` of a block, superseded by `w`, is needed iff some retention point (a
//! checkpoint or a child's branch point) lies in `[v.seq, w.seq)`; the newest version is
//! needed iff the timeline is a head or a retention point lies at or after it. GC holds the
//! timeline's lock for each batch and re-reads the versions under it, so it never races
//! the data path's own superseding (which uses the same predicate).

use crate::catalog::TimelineState;
use crate::codec::{self, Counters, HEAD_SLOT, MapValue, Version, decode_map_key, map_key_first};
use crate::db::{self, CF_MAP, cf};
use crate::engine::{Inner, Released, Snapshotter, Work};
use crate::error::Result;
use crate::ids::{Lba, Seq, TimelineId};
use rocksdb::{ReadOptions, WriteBatch};
use std::collections::HashMap;
use std::sync::Arc;

/// Keys examined per locked batch: bounds how long the data path may wait on GC.
const GC_BATCH_KEYS: usize = 4096;

impl Snapshotter {
    /// Is background work (GC, flattening) pending?
    pub fn has_background_work(&self) -> bool {
        !self.inner.work.lock().is_empty()
    }

    /// Runs one unit of background work. Returns `None` when there was none, else what it
    /// released (hand it to the data store once `sync` made the release durable).
    pub fn run_background_work(&self) -> Result<Option<Released>> {
        let w = self.inner.work.lock().pop_first();
        let Some(w) = w else { return Ok(None) };
        let res = match w {
            Work::Gc(t) => self.inner.gc_timeline(t),
            Work::Flatten(t) => self.inner.flatten_timeline(t),
        };
        match res {
            Ok(r) => {
                if !self.inner.work.lock().contains(&w) {
                    let mut b = WriteBatch::default();
                    b.delete_cf(cf(&self.inner.db, db::CF_META), w.marker());
                    db::write(&self.inner.db, b, false)?;
                }
                Ok(Some(r))
            }
            Err(e) => {
                // Keep it queued; the marker is still persisted.
                self.inner.work.lock().insert(w);
                Err(e)
            }
        }
    }

    /// Runs all pending background work to completion (tests, shutdown, `gc` command).
    pub fn run_all_background_work(&self) -> Result<Released> {
        let mut all = Released::default();
        while let Some(r) = self.run_background_work()? {
            all.extend(r);
        }
        Ok(all)
    }
}

impl Inner {
    pub(crate) fn gc_timeline(&self, tid: TimelineId) -> Result<Released> {
        let Some(t) = self.catalog.read().timeline(tid).cloned() else {
            return Ok(Released::default());
        };
        let vol = self.catalog.read().by_id.get(&t.volume).cloned();
        let mut released = Released::default();
        let mut cursor = map_key_first(tid, Lba(0)).to_vec();
        let upper = map_key_first(TimelineId(tid.0 + 1), Lba(0)).to_vec();
        let map = cf(&self.db, CF_MAP);
        loop {
            let tm = t.m.lock();
            if tm.deleted {
                return Ok(released);
            }
            let mut ro = ReadOptions::default();
            ro.set_total_order_seek(true);
            ro.set_iterate_upper_bound(upper.clone());
            let mut it = self.db.raw_iterator_cf_opt(map, ro);
            it.seek(&cursor);
            let mut b = WriteBatch::default();
            let mut groups: HashMap<u64, i64> = HashMap::new();
            let mut delta = Counters::default();
            let mut examined = 0;
            // (key seq, version) of one block, newest first (the head slot, then history).
            let mut group: Vec<(Seq, Version)> = Vec::new();
            let mut group_lba: Option<Lba> = None;
            let bottomless = t.parent.is_none() || t.is_flattened();
            let mut finished = true;
            loop {
                let next = match it.key() {
                    Some(k) => Some(decode_map_key(k)?),
                    None => None,
                };
                let boundary = match (next, group_lba) {
                    (Some((_, lba, _)), Some(g)) => lba != g,
                    (None, _) => true,
                    (Some(_), None) => false,
                };
                if boundary && let Some(g) = group_lba.take() {
                    self.collect_group(
                        &t,
                        &tm,
                        g,
                        &group,
                        bottomless,
                        &mut b,
                        &mut released,
                        &mut groups,
                        &mut delta,
                    );
                    group.clear();
                    if examined >= GC_BATCH_KEYS {
                        if let Some((_, lba, _)) = next {
                            cursor = map_key_first(tid, lba).to_vec();
                            finished = false;
                        }
                        break;
                    }
                }
                let Some((_, lba, seq)) = next else { break };
                let version = Version::decode(seq, it.value().unwrap_or_default())?;
                group_lba = Some(lba);
                group.push((seq, version));
                examined += 1;
                it.next();
            }
            it.status()?;
            drop(it);
            self.put_group_merges(&mut b, &groups);
            if let Some(v) = vol.as_ref().filter(|v| !v.is_deleted()) {
                self.put_counter_merge(&mut b, v.id, &delta);
            }
            fail::fail_point!("snapshotter::gc::before_write", |_| Err(
                crate::error::Error::Injected("snapshotter::gc::before_write")
            ));
            db::write(&self.db, b, false)?;
            if let Some(v) = vol.as_ref() {
                v.counters.lock().add(&delta);
            }
            released.empty_groups.extend(self.apply_groups(&groups));
            drop(tm);
            if finished {
                break;
            }
        }
        if t.m.lock().unreferenced() {
            self.delete_timeline(&t)?;
        }
        Ok(released)
    }

    /// Decides which versions of one block stay; deletes the rest into `b`, and keeps the
    /// head slot holding the newest remaining version.
    #[allow(clippy::too_many_arguments)]
    fn collect_group(
        &self,
        t: &TimelineState,
        tm: &crate::catalog::TimelineMut,
        lba: Lba,
        versions: &[(Seq, Version)],
        bottomless: bool,
        b: &mut WriteBatch,
        released: &mut Released,
        groups: &mut HashMap<u64, i64>,
        delta: &mut Counters,
    ) {
        // versions are newest first
        let mut keep: Vec<bool> = versions
            .iter()
            .enumerate()
            .map(|(i, (_, v))| {
                if i == 0 {
                    tm.retained_from(v.seq)
                } else {
                    tm.retained(v.seq, versions[i - 1].1.seq)
                }
            })
            .collect();
        if bottomless {
            // A tombstone with nothing kept below it shadows nothing.
            for i in (0..versions.len()).rev() {
                if !keep[i] {
                    continue;
                }
                if versions[i].1.value == MapValue::Tombstone {
                    keep[i] = false;
                } else {
                    break;
                }
            }
        }
        let map = cf(&self.db, CF_MAP);
        let head_dropped = versions.first().is_some_and(|(k, _)| *k == HEAD_SLOT) && !keep[0];
        for (i, (key_seq, v)) in versions.iter().enumerate() {
            if !keep[i] {
                if *key_seq != HEAD_SLOT {
                    b.delete_cf(map, codec::map_key(t.id, lba, *key_seq));
                }
                Inner::release_version(&v.value, released, groups, delta);
            }
        }
        if head_dropped {
            // The newest version left (a history one) takes over the head slot.
            match versions.iter().zip(&keep).find(|(_, k)| **k) {
                Some(((key_seq, v), _)) => {
                    b.put_cf(map, codec::head_key(t.id, lba), v.encode_head());
                    b.delete_cf(map, codec::map_key(t.id, lba, *key_seq));
                }
                None => b.delete_cf(map, codec::head_key(t.id, lba)),
            }
        }
    }

    /// Removes a timeline nothing reads (its versions are already gone) and lets its
    /// parent release what the branch point kept alive.
    fn delete_timeline(&self, t: &Arc<TimelineState>) -> Result<()> {
        let mut b = WriteBatch::default();
        b.delete_cf(cf(&self.db, db::CF_TIMELINES), codec::u64_key(t.id.0));
        b.delete_cf(cf(&self.db, db::CF_HEADS), codec::u64_key(t.id.0));
        b.delete_cf(cf(&self.db, db::CF_META), Work::Flatten(t.id).marker());
        if let Some((p, _)) = &t.parent {
            self.schedule(&mut b, Work::Gc(p.id));
        }
        {
            let mut tm = t.m.lock();
            if !tm.unreferenced() || tm.deleted {
                return Ok(());
            }
            fail::fail_point!("snapshotter::delete_timeline", |_| Err(
                crate::error::Error::Injected("snapshotter::delete_timeline")
            ));
            db::write(&self.db, b, true)?;
            tm.deleted = true;
        }
        self.catalog.write().timelines.remove(&t.id);
        if let Some((p, seq)) = &t.parent {
            p.m.lock().remove_retention(*seq);
        }
        Ok(())
    }
}
