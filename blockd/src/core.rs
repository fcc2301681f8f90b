//! `Core`: what every volume of a daemon shares: the metadata engine, the segment store,
//! the reclamation queue and the metrics. FLUSH is global (all volumes share the segments
//! and the metadata log), which is also what makes NBD multi-conn safe.

use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::reclaim::Reclaimer;
use chunkstore::{BlockAddr, LocalStore};
use snapshotter::{Released, Snapshotter};
use std::time::Instant;

#[derive(Debug)]
pub struct Core {
    pub snap: Snapshotter,
    pub local: LocalStore,
    pub reclaim: Reclaimer,
    pub metrics: Metrics,
    pub last_flush: parking_lot::Mutex<Instant>,
}

impl Core {
    /// Makes every completed write durable: segment data first, then the map entries
    /// pointing at it. Releases recorded before the flush started become reclaimable.
    pub async fn flush(&self) -> Result<(), EngineError> {
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

    /// Punches released blocks and deletes released segments whose releases are durable
    /// and no longer read.
    pub async fn reclaim_ready(&self) {
        let Released {
            blocks,
            empty_groups,
        } = self.reclaim.ready();
        if !blocks.is_empty() {
            let addrs = blocks
                .into_iter()
                .map(|p| BlockAddr {
                    segment: p.group,
                    block: p.index,
                })
                .collect();
            if let Err(e) = self.local.punch(addrs).await {
                tracing::warn!("punching released blocks failed (space stays allocated): {e}");
            }
        }
        for g in empty_groups {
            if self.local.is_idle(g) && self.snap.group_ref(g) == 0 {
                match self.local.remove_segment(g) {
                    Ok(_) => tracing::debug!(segment = g, "removed empty segment"),
                    Err(e) => tracing::warn!(segment = g, "removing empty segment failed: {e}"),
                }
            }
        }
    }

    /// Segments that became idle with no references left go through the same durability
    /// pipeline as released blocks (the batch that emptied them precedes this call).
    pub fn queue_idle_segments(&self) {
        let idle = self.local.take_idle();
        let empty: Vec<u64> = idle
            .into_iter()
            .filter(|g| self.snap.group_ref(*g) == 0)
            .collect();
        if !empty.is_empty() {
            self.reclaim.released(Released {
                blocks: Vec::new(),
                empty_groups: empty,
            });
        }
    }
}
