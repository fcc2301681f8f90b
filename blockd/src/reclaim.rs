//! Deferred reclamation of released blocks and segments.
//!
//! A block the map stopped referencing may only be punched (and a segment deleted) when
//! 1. the batch that released it is durable: otherwise a crash brings the old map entry
//!    back, pointing at a hole; so releases wait for the next completed flush, and
//! 2. no read that resolved the old mapping before the release is still reading it: reads
//!    enter the [`ReadGate`] and releases wait until every read of an epoch up to theirs
//!    has finished.
//!
//! Segments are only deleted when they are idle (sealed, no append in flight) and their
//! reference count is zero; a segment noticed idle is queued only if its count is already
//! zero, so the batch that zeroed it is covered by the durability rule above.

use parking_lot::Mutex;
use snapshotter::Released;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Default)]
struct GateState {
    epoch: u64,
    active: BTreeMap<u64, usize>,
}

/// Tracks in-flight reads by epoch.
#[derive(Debug, Default)]
pub struct ReadGate {
    state: Mutex<GateState>,
}

/// Held for the duration of one read.
#[derive(Debug)]
pub struct ReadGuard {
    gate: Arc<ReadGate>,
    epoch: u64,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut st = self.gate.state.lock();
        if let Some(n) = st.active.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                st.active.remove(&self.epoch);
            }
        }
    }
}

impl ReadGate {
    pub fn enter(self: &Arc<Self>) -> ReadGuard {
        let mut st = self.state.lock();
        let epoch = st.epoch;
        *st.active.entry(epoch).or_insert(0) += 1;
        ReadGuard {
            gate: self.clone(),
            epoch,
        }
    }

    /// Closes the current epoch and returns it: reads that start from now on cannot see
    /// anything released before this call.
    fn bump(&self) -> u64 {
        let mut st = self.state.lock();
        let e = st.epoch;
        st.epoch += 1;
        e
    }

    /// Is every read of epoch `e` or older finished?
    fn drained(&self, e: u64) -> bool {
        self.state
            .lock()
            .active
            .first_key_value()
            .is_none_or(|(oldest, _)| *oldest > e)
    }
}

/// The reclamation queue.
#[derive(Debug, Default)]
pub struct Reclaimer {
    pub gate: Arc<ReadGate>,
    /// Released by batches that may not be durable yet.
    not_durable: Mutex<Released>,
    /// Durable, waiting for reads of their epoch (key) to drain.
    waiting: Mutex<BTreeMap<u64, Released>>,
}

impl Reclaimer {
    pub fn released(&self, r: Released) {
        if !r.is_empty() {
            self.not_durable.lock().extend(r);
        }
    }

    /// Called before a flush starts syncing: everything released so far becomes durable
    /// when that flush completes.
    pub fn capture(&self) -> Released {
        std::mem::take(&mut *self.not_durable.lock())
    }

    /// The flush that followed `capture` failed: keep waiting for the next one.
    pub fn restore(&self, r: Released) {
        self.not_durable.lock().extend(r);
    }

    /// The flush that followed `capture` completed.
    pub fn durable(&self, r: Released) {
        if r.is_empty() {
            return;
        }
        let e = self.gate.bump();
        self.waiting.lock().entry(e).or_default().extend(r);
    }

    /// Everything safe to reclaim now.
    pub fn ready(&self) -> Released {
        let mut out = Released::default();
        let mut w = self.waiting.lock();
        while let Some((&e, _)) = w.first_key_value() {
            if !self.gate.drained(e) {
                break;
            }
            if let Some((_, r)) = w.pop_first() {
                out.extend(r);
            }
        }
        out
    }

    pub fn has_not_durable(&self) -> bool {
        !self.not_durable.lock().is_empty()
    }

    pub fn pending_blocks(&self) -> usize {
        self.not_durable.lock().blocks.len()
            + self
                .waiting
                .lock()
                .values()
                .map(|r| r.blocks.len())
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshotter::PhysBlock;

    fn rel(i: u32) -> Released {
        Released {
            blocks: vec![PhysBlock { group: 1, index: i }],
            empty_groups: vec![],
        }
    }

    #[test]
    fn waits_for_durability_and_old_reads() {
        let r = Reclaimer::default();
        let old_read = r.gate.enter();
        r.released(rel(1));
        assert!(r.ready().is_empty(), "not durable yet");
        let cap = r.capture();
        r.released(rel(2)); // after the capture: not covered by this flush
        r.durable(cap);
        assert!(r.ready().is_empty(), "an older read is still running");
        let new_read = r.gate.enter();
        drop(old_read);
        assert_eq!(r.ready().blocks, vec![PhysBlock { group: 1, index: 1 }]);
        drop(new_read);
        assert!(r.ready().is_empty(), "block 2 is still not durable");
        let cap = r.capture();
        r.durable(cap);
        assert_eq!(r.ready().blocks, vec![PhysBlock { group: 1, index: 2 }]);
    }

    #[test]
    fn failed_flush_keeps_releases() {
        let r = Reclaimer::default();
        r.released(rel(1));
        let cap = r.capture();
        r.restore(cap);
        assert!(r.has_not_durable());
        assert!(r.ready().is_empty());
    }
}
