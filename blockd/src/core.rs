//! `Core`: what every volume of a daemon shares: the metadata engine, the segment store,
//! the reclamation queue and the metrics. FLUSH is global (all volumes share the segments
//! and the metadata log), which is also what makes NBD multi-conn safe.

use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::reclaim::Reclaimer;
use chunkstore::{ChunkId, LocalStore};
use snapshotter::{Released, Snapshotter};
use std::time::Instant;

#[derive(Debug)]
pub struct Core {
    pub snap: Snapshotter,
    pub local: LocalStore,
    pub reclaim: Reclaimer,
    pub metrics: Metrics,
    pub last_flush: parking_lot::Mutex<Instant>,
    pub flushes: FlushGate,
    /// Volumes another daemon took over (lease lost): writes are refused.
    pub fenced: parking_lot::RwLock<std::collections::HashSet<String>>,
    /// Defragmentation on read (see [`crate::defrag`]).
    pub defrag: crate::defrag::Defrag,
}

/// Group flush: concurrent FLUSH/FUA requests share one sync, as long as that sync started
/// after they were issued (so it covers every write they must make durable).
#[derive(Debug, Default)]
pub struct FlushGate {
    requested: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicU64,
    lock: tokio::sync::Mutex<()>,
}

impl Core {
    /// Makes every completed write durable: segment data first, then the map entries
    /// pointing at it. Releases recorded before the flush started become reclaimable.
    pub async fn flush(&self) -> Result<(), EngineError> {
        use std::sync::atomic::Ordering::SeqCst;
        let ticket = self.flushes.requested.fetch_add(1, SeqCst) + 1;
        let _serial = self.flushes.lock.lock().await;
        if self.flushes.done.load(SeqCst) >= ticket {
            return Ok(()); // a sync that started after this call already completed
        }
        let target = self.flushes.requested.load(SeqCst);
        self.flush_now().await?;
        self.flushes.done.fetch_max(target, SeqCst);
        Ok(())
    }

    async fn flush_now(&self) -> Result<(), EngineError> {
        let captured = self.reclaim.capture();
        let r = async {
            self.local.sync().await?;
            let snap = self.snap.clone();
            tokio::task::spawn_blocking(move || snap.sync())
                .await
                .map_err(|e| EngineError::Internal(format!("sync task: {e}")))??;
            Ok::<(), EngineError>(())
        }
        .await;
        match r {
            Ok(()) => {
                self.reclaim.durable(captured);
                *self.last_flush.lock() = Instant::now();
                Ok(())
            }
            Err(e) => {
                self.reclaim.restore(captured);
                tracing::error!("flush failed: {e}");
                Err(e)
            }
        }
    }

    /// Punches released blocks and chunks, and deletes segments none of whose chunks is
    /// referenced, once their release is durable and no longer read.
    ///
    /// Emptied segments go first: a segment removed whole needs no punch of the blocks the
    /// same batch released in it, and with recycling on its file goes to the free pool with
    /// its blocks still written (punched space would be unwritten again after the refill).
    pub async fn reclaim_ready(&self) {
        let Released {
            blocks,
            empty_groups,
        } = self.reclaim.ready();
        let empty: Vec<u64> = empty_groups
            .into_iter()
            .filter(|g| self.snap.group_ref(*g) == 0) // else referenced again
            .collect();
        let mut segments: Vec<u64> = empty.iter().map(|g| ChunkId(*g).segment()).collect();
        segments.sort_unstable();
        segments.dedup();
        for seg in segments {
            if self.local.is_idle(seg) && self.segment_unreferenced(seg) {
                match self.local.remove_segment(seg) {
                    Ok(_) => tracing::debug!(segment = seg, "removed empty segment"),
                    Err(e) => tracing::warn!(segment = seg, "removing empty segment failed: {e}"),
                }
            }
        }
        if let Err(e) = self.local.punch_deferred().await {
            tracing::warn!("punching released space failed (it stays allocated): {e}");
        }
        // Blocks and chunks of the segments just removed are skipped by the store.
        if !blocks.is_empty() {
            let addrs = blocks.into_iter().map(crate::volume::block_addr).collect();
            if let Err(e) = self.local.release(addrs).await {
                tracing::warn!("releasing blocks failed (their space stays allocated): {e}");
            }
        }
        for g in empty {
            let chunk = ChunkId(g);
            if let Err(e) = self.local.release_chunk(chunk).await {
                tracing::warn!(chunk = g, "releasing a chunk failed: {e}");
            }
            if let Some(tier) = self.local.tier()
                && let Err(e) = tier.release_chunk(chunk)
            {
                tracing::warn!(chunk = g, "releasing a chunk's object failed: {e}");
            }
        }
    }

    /// No chunk of the segment holds a referenced block.
    fn segment_unreferenced(&self, seg: u64) -> bool {
        (0..self.local.chunks_per_segment() as u64).all(|k| self.snap.group_ref(seg << 8 | k) == 0)
    }

    /// Segments that became idle with no references left go through the same durability
    /// pipeline as released blocks (the batch that emptied them precedes this call).
    pub fn queue_idle_segments(&self) {
        let idle = self.local.take_idle();
        let empty: Vec<u64> = idle
            .into_iter()
            .filter(|s| self.segment_unreferenced(*s))
            .map(|s| s << 8)
            .collect();
        if !empty.is_empty() {
            self.reclaim.released(Released {
                blocks: Vec::new(),
                empty_groups: empty,
            });
        }
    }
}
