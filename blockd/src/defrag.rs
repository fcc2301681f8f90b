//! Defragmentation on read.
//!
//! The segment log stores blocks in the order they were written, so random overwrites
//! scatter a volume's blocks: a later sequential read of the range becomes one small disk
//! read per scattered block. When a large read (at least [`MIN_READ_BLOCKS`]) needed many
//! separate disk reads (more than one per [`BLOCKS_PER_RUN`] blocks, and more than
//! [`MIN_RUNS`]), the bytes it just read and verified are appended again as one run in
//! block order, made durable, and the block map is switched to the new copies with
//! [`snapshotter::VolumeHandle::relocate`]; the next read of the range is one disk read.
//!
//! - Nothing is read twice: the relocation copies the read's own verified buffer, in a
//!   background task (the read's reply does not wait).
//! - Conditional: a block written, discarded or restored since the read keeps its new
//!   state, and the copy is freed. Blocks a checkpoint or clone still sees are not moved
//!   (a flattened clone may hold a copy of their address); they are moved once nothing
//!   else sees them.
//! - Durable before visible: the new copies are synced before the map points at them, and
//!   the old copies are punched only after the next flush, like any overwrite.
//! - Bounded: at most [`MAX_INFLIGHT_BYTES`] of relocation in flight per daemon; reads
//!   beyond that are served without relocating.
//! - Off for read-only attachments, fenced volumes and with `storage.defrag_on_read = false`.
//!
//! Metrics: `blockd_defrag_bytes_total{result="moved"|"kept"|"busy"}` (docs/metrics.md).

use crate::core::Core;
use chunkstore::{AlignedBuf, BLOCK_SIZE};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use snapshotter::{Mapping, Released, Relocation, VolumeHandle};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Reads shorter than this (128 KiB) never trigger a relocation.
pub const MIN_READ_BLOCKS: usize = 32;
/// A read is fragmented when it needed more than one disk read per this many blocks...
pub const BLOCKS_PER_RUN: usize = 16;
/// ... and more than this many disk reads.
pub const MIN_RUNS: usize = 4;
/// Relocation bytes in flight at most (per daemon).
pub const MAX_INFLIGHT_BYTES: u64 = 64 << 20;

/// The daemon's defragmentation state.
#[derive(Debug)]
pub struct Defrag {
    enabled: bool,
    inflight: Arc<AtomicU64>,
    family: Family<ResultLabels, Counter>,
    moved: Counter,
    kept: Counter,
    busy: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// Is a read of `blocks` blocks that needed `runs` contiguous disk reads worth rewriting?
pub fn fragmented(blocks: usize, runs: usize) -> bool {
    blocks >= MIN_READ_BLOCKS && runs > MIN_RUNS && runs * BLOCKS_PER_RUN > blocks
}

/// Relocation bytes reserved in flight, returned on drop.
#[derive(Debug)]
struct Reservation {
    inflight: Arc<AtomicU64>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.inflight.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl Defrag {
    pub fn new(enabled: bool) -> Defrag {
        let family: Family<ResultLabels, Counter> = Family::default();
        let get = |r: &str| {
            family
                .get_or_create(&ResultLabels { result: r.into() })
                .clone()
        };
        let (moved, kept, busy) = (get("moved"), get("kept"), get("busy"));
        Defrag {
            enabled,
            inflight: Arc::default(),
            family,
            moved,
            kept,
            busy,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        reg.register(
            "blockd_defrag_bytes",
            "Bytes defragmentation on read rewrote in block order (moved), copied and freed again because the block changed or a checkpoint sees it (kept), or left fragmented because too much relocation was in flight (busy)",
            self.family.clone(),
        );
    }

    /// Waits until no relocation is in flight (clean shutdown; tests before a simulated
    /// crash, which must not leave a task holding the engine open).
    pub async fn idle(&self) {
        while self.inflight.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// (moved, kept) bytes so far.
    pub fn totals(&self) -> (u64, u64) {
        (self.moved.get(), self.kept.get())
    }

    /// Bytes of fragmented reads not relocated because the daemon was busy relocating.
    pub fn busy_bytes(&self) -> u64 {
        self.busy.get()
    }

    fn reserve(&self, bytes: u64) -> Option<Reservation> {
        let prev = self.inflight.fetch_add(bytes, Ordering::AcqRel);
        let r = Reservation {
            inflight: self.inflight.clone(),
            bytes,
        };
        (prev + bytes <= MAX_INFLIGHT_BYTES).then_some(r)
    }
}

/// Rewrites the data blocks of a fragmented read in block order, in the background.
/// `maps` are the read's resolved blocks `[lba0, lba0 + maps.len())` and `data` their
/// verified bytes (block `i` at byte `i * 4096`).
pub(crate) fn spawn(
    core: &Arc<Core>,
    handle: &VolumeHandle,
    lba0: u64,
    maps: &[Mapping],
    data: &AlignedBuf,
) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let picked: Vec<(usize, snapshotter::PhysBlock, u32)> = maps
        .iter()
        .enumerate()
        .filter_map(|(i, m)| match *m {
            Mapping::Data { phys, crc } => Some((i, phys, crc)),
            Mapping::Zero => None,
        })
        .collect();
    if picked.is_empty() {
        return;
    }
    let bytes = (picked.len() * BLOCK_SIZE) as u64;
    let Some(reservation) = core.defrag.reserve(bytes) else {
        // Busy: the range stays as it is until a later read.
        core.defrag.busy.inc_by(bytes);
        return;
    };
    let mut buf = AlignedBuf::for_overwrite(picked.len() * BLOCK_SIZE);
    {
        let src = data.as_slice();
        let dst = buf.as_mut_slice();
        for (k, (i, _, _)) in picked.iter().enumerate() {
            dst[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE]
                .copy_from_slice(&src[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]);
        }
    }
    let core = core.clone();
    let handle = handle.clone();
    rt.spawn(async move {
        if let Err(e) = relocate(&core, &handle, lba0, &picked, buf).await {
            tracing::warn!(
                volume = handle.name(),
                "defragmentation skipped a range: {e}"
            );
        }
        // Release the engine before the reservation: once `idle()` sees nothing in
        // flight, no task holds the metadata database open.
        drop(handle);
        drop(core);
        drop(reservation);
    });
}

async fn relocate(
    core: &Core,
    handle: &VolumeHandle,
    lba0: u64,
    picked: &[(usize, snapshotter::PhysBlock, u32)],
    buf: AlignedBuf,
) -> Result<(), crate::error::EngineError> {
    let n = picked.len();
    let whole = 0..n;
    let a = core
        .local
        .append_ranges(handle.stream(), Arc::new(buf), std::slice::from_ref(&whole))
        .await?;
    let to: Vec<snapshotter::PhysBlock> = a.addrs().map(crate::volume::phys_block).collect();
    // The copies must be on stable storage before the map may point at them.
    let synced = core.local.sync().await;
    let moves: Vec<Relocation> = picked
        .iter()
        .zip(&to)
        .zip(&a.crcs)
        .filter(|(((_, _, crc), _), got)| crc == *got)
        .map(|(((i, from, crc), to), _)| Relocation {
            lba: lba0 + *i as u64,
            from: *from,
            to: *to,
            crc: *crc,
        })
        .collect();
    let result = match synced {
        Ok(()) if moves.len() == n => handle.relocate(&moves).map_err(Into::into),
        Ok(()) => Err(crate::error::EngineError::Internal(
            "a relocated copy's checksum differs from the block read".into(),
        )),
        Err(e) => Err(e.into()),
    };
    let (moved, released, rejected) = match result {
        Ok(r) => (r.moved, r.released, r.rejected),
        Err(e) => {
            // Nothing points at the copies: free them all.
            core.reclaim.released(Released {
                blocks: to,
                empty_groups: Vec::new(),
            });
            drop(a);
            core.defrag.kept.inc_by((n * BLOCK_SIZE) as u64);
            return Err(e);
        }
    };
    core.reclaim.released(released);
    if !rejected.is_empty() {
        core.reclaim.released(Released {
            blocks: rejected.clone(),
            empty_groups: Vec::new(),
        });
    }
    drop(a); // referenced now: the segment may seal and go idle
    core.defrag.moved.inc_by((moved * BLOCK_SIZE) as u64);
    core.defrag
        .kept
        .inc_by((rejected.len() * BLOCK_SIZE) as u64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_large_fragmented_reads_qualify() {
        assert!(!fragmented(1, 1));
        assert!(!fragmented(31, 31)); // short
        assert!(!fragmented(256, 1)); // contiguous
        assert!(!fragmented(256, 16)); // one run per 16 blocks: fine
        assert!(fragmented(256, 17));
        assert!(!fragmented(32, 4)); // at most MIN_RUNS
        assert!(fragmented(32, 5));
    }

    #[test]
    fn reservations_are_bounded_and_returned() {
        let d = Defrag::new(true);
        let a = d.reserve(MAX_INFLIGHT_BYTES / 2).unwrap();
        let b = d.reserve(MAX_INFLIGHT_BYTES / 2).unwrap();
        assert!(d.reserve(4096).is_none());
        drop(a);
        assert!(d.reserve(4096).is_some());
        drop(b);
        assert_eq!(d.inflight.load(Ordering::Acquire), 0);
    }
}
