//! `Engine`: the daemon's volumes. Opens the metadata engine and the segment store under one
//! data directory, hands out `Volume`s to front ends (attachments), runs admin operations
//! with the documented semantics for attached volumes, and drives background work (GC,
//! flattening, reclamation).
//!
//! Attached volumes: restore and delete refuse while clients are attached unless `force`,
//! which cancels the attachments' session (front ends close those connections), waits for
//! them to go, flushes, and then proceeds. Checkpoint create and clone never need clients
//! to leave: the checkpoint covers every write acknowledged before the request.

use crate::core::Core;
use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::reclaim::Reclaimer;
use crate::volume::Volume;
use chunkstore::{LocalConfig, LocalStore};
use parking_lot::Mutex;
use serde::Serialize;
use snapshotter::{CheckpointId, CheckpointInfo, Snapshotter, VolumeInfo};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    pub local: LocalConfig,
    pub meta_cache_bytes: usize,
    pub max_read_depth: usize,
    /// How long a forced restore/delete waits for attached clients to disconnect.
    pub detach_timeout: Duration,
}

impl EngineConfig {
    pub fn new(data_dir: &Path) -> EngineConfig {
        EngineConfig {
            data_dir: data_dir.to_path_buf(),
            local: LocalConfig::default(),
            meta_cache_bytes: 64 << 20,
            max_read_depth: 4,
            detach_timeout: Duration::from_secs(30),
        }
    }
}

/// `volume stat`: the snapshotter's accounting plus what only the daemon knows.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeStat {
    #[serde(flatten)]
    pub info: VolumeInfo,
    /// Bytes of this volume's blocks on the local disk.
    pub local_bytes: u64,
    /// Front-end connections attached right now.
    pub attached_clients: usize,
}

/// A checkpoint operation's result with the time it took inside the daemon.
#[derive(Debug, Clone, Serialize)]
pub struct Timed<T> {
    #[serde(flatten)]
    pub value: T,
    pub duration_us: u64,
}

#[derive(Debug)]
struct Slot {
    volume: Arc<Volume>,
    clients: AtomicUsize,
    session: Mutex<CancellationToken>,
    transitioning: AtomicBool,
    detached: tokio::sync::Notify,
}

/// One front-end connection's hold on a volume. Dropping it detaches.
#[derive(Debug)]
pub struct AttachGuard {
    slot: Arc<Slot>,
}

impl Drop for AttachGuard {
    fn drop(&mut self) {
        self.slot.clients.fetch_sub(1, Ordering::AcqRel);
        self.slot.detached.notify_waiters();
    }
}

#[derive(Debug)]
pub struct Attached {
    pub volume: Arc<Volume>,
    /// Cancelled when the daemon needs the client gone (forced restore/delete).
    pub session: CancellationToken,
    pub guard: AttachGuard,
}

#[derive(Debug)]
pub struct Engine {
    pub core: Arc<Core>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    cfg: EngineConfig,
}

impl Engine {
    pub fn open(cfg: EngineConfig) -> Result<Arc<Engine>, EngineError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            EngineError::Invalid(format!(
                "cannot create data dir {}: {e}",
                cfg.data_dir.display()
            ))
        })?;
        let snap = Snapshotter::open(
            &cfg.data_dir.join("meta"),
            snapshotter::Options {
                cache_bytes: cfg.meta_cache_bytes,
                max_read_depth: cfg.max_read_depth,
            },
        )?;
        let local = LocalStore::open(&cfg.data_dir.join("segments"), cfg.local.clone())?;
        // Segments nothing references (appends that never committed before a crash, or
        // emptied ones whose deletion was interrupted) go now; the database is durable.
        let refs = snap.group_refs();
        for id in local.segment_ids() {
            if !refs.contains_key(&id) {
                local.remove_segment(id)?;
            }
        }
        local.take_idle();
        local.trim_tails();
        let core = Arc::new(Core {
            snap,
            local,
            reclaim: Reclaimer::default(),
            metrics: Metrics::default(),
            last_flush: Mutex::new(Instant::now()),
        });
        Ok(Arc::new(Engine {
            core,
            slots: Mutex::new(HashMap::new()),
            cfg,
        }))
    }

    pub fn data_dir(&self) -> &Path {
        &self.cfg.data_dir
    }

    pub fn snapshotter(&self) -> &Snapshotter {
        &self.core.snap
    }

    fn slot(&self, name: &str) -> Result<Arc<Slot>, EngineError> {
        let mut slots = self.slots.lock();
        if let Some(s) = slots.get(name) {
            if !s.volume_deleted() {
                return Ok(s.clone());
            }
            slots.remove(name);
        }
        let handle = self.core.snap.volume(name)?;
        let slot = Arc::new(Slot {
            volume: Arc::new(Volume::new(self.core.clone(), handle, false)),
            clients: AtomicUsize::new(0),
            session: Mutex::new(CancellationToken::new()),
            transitioning: AtomicBool::new(false),
            detached: tokio::sync::Notify::new(),
        });
        slots.insert(name.to_string(), slot.clone());
        Ok(slot)
    }

    /// A volume for direct use (tests, benchmarks) without an attachment.
    pub fn volume(&self, name: &str) -> Result<Arc<Volume>, EngineError> {
        Ok(self.slot(name)?.volume.clone())
    }

    /// Attaches a front-end connection to a volume.
    pub fn attach(&self, name: &str) -> Result<Attached, EngineError> {
        let slot = self.slot(name)?;
        if slot.transitioning.load(Ordering::Acquire) {
            return Err(EngineError::Transitioning(name.to_string()));
        }
        slot.clients.fetch_add(1, Ordering::AcqRel);
        let session = slot.session.lock().clone();
        Ok(Attached {
            volume: slot.volume.clone(),
            session,
            guard: AttachGuard { slot },
        })
    }

    pub fn attached_clients(&self, name: &str) -> usize {
        self.slots
            .lock()
            .get(name)
            .map_or(0, |s| s.clients.load(Ordering::Acquire))
    }

    pub fn create_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeStat, EngineError> {
        let info = self.core.snap.create_volume(name, size_bytes)?;
        Ok(self.stat_of(info))
    }

    pub fn list_volumes(&self) -> Vec<VolumeStat> {
        self.core
            .snap
            .list_volumes()
            .into_iter()
            .map(|i| self.stat_of(i))
            .collect()
    }

    pub fn stat(&self, name: &str) -> Result<VolumeStat, EngineError> {
        Ok(self.stat_of(self.core.snap.stat(name)?))
    }

    fn stat_of(&self, info: VolumeInfo) -> VolumeStat {
        VolumeStat {
            local_bytes: info.owned_bytes,
            attached_clients: self.attached_clients(&info.name),
            info,
        }
    }

    /// Runs `f` with the volume marked transitioning and no client attached (forcing
    /// them off if `force`), after a flush.
    async fn exclusive<T>(
        &self,
        name: &str,
        force: bool,
        f: impl FnOnce() -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let slot = self.slot(name)?;
        if slot.transitioning.swap(true, Ordering::AcqRel) {
            return Err(EngineError::Transitioning(name.to_string()));
        }
        let r = async {
            let clients = slot.clients.load(Ordering::Acquire);
            if clients > 0 {
                if !force {
                    return Err(EngineError::Busy {
                        name: name.to_string(),
                        clients,
                    });
                }
                tracing::info!(volume = name, clients, "disconnecting clients (forced)");
                let old = std::mem::replace(&mut *slot.session.lock(), CancellationToken::new());
                old.cancel();
                let deadline = Instant::now() + self.cfg.detach_timeout;
                while slot.clients.load(Ordering::Acquire) > 0 {
                    let wait = slot.detached.notified();
                    if slot.clients.load(Ordering::Acquire) == 0 {
                        break;
                    }
                    if tokio::time::timeout_at(deadline.into(), wait)
                        .await
                        .is_err()
                    {
                        return Err(EngineError::Busy {
                            name: name.to_string(),
                            clients: slot.clients.load(Ordering::Acquire),
                        });
                    }
                }
            }
            self.core.flush().await?;
            f()
        }
        .await;
        slot.transitioning.store(false, Ordering::Release);
        r
    }

    pub async fn delete_volume(&self, name: &str, force: bool) -> Result<(), EngineError> {
        let t0 = Instant::now();
        let snap = self.core.snap.clone();
        self.exclusive(name, force, || Ok(snap.delete_volume(name)?))
            .await?;
        self.slots.lock().remove(name);
        self.core.metrics.forget_volume(name);
        self.core
            .metrics
            .observe_admin("volume_delete", t0.elapsed());
        Ok(())
    }

    pub async fn clone_volume(
        &self,
        name: &str,
        checkpoint: CheckpointId,
        new_name: &str,
    ) -> Result<Timed<VolumeStat>, EngineError> {
        let t0 = Instant::now();
        let info = self.core.snap.clone_volume(name, checkpoint, new_name)?;
        let took = t0.elapsed();
        self.core.metrics.observe_admin("clone", took);
        Ok(Timed {
            value: self.stat_of(info),
            duration_us: took.as_micros() as u64,
        })
    }

    /// A checkpoint of everything acknowledged before the call; durable when it returns.
    pub async fn create_checkpoint(
        &self,
        name: &str,
        comment: &str,
    ) -> Result<Timed<CheckpointInfo>, EngineError> {
        self.core.snap.stat(name)?;
        self.core.flush().await?;
        let t0 = Instant::now();
        let cp = self.core.snap.create_checkpoint(name, comment)?;
        let took = t0.elapsed();
        if let Err(e) = self.core.flush().await {
            let _ = self.core.snap.delete_checkpoint(name, cp.id);
            return Err(e);
        }
        self.core.metrics.observe_admin("checkpoint_create", took);
        Ok(Timed {
            value: cp,
            duration_us: took.as_micros() as u64,
        })
    }

    pub fn list_checkpoints(&self, name: &str) -> Result<Vec<CheckpointInfo>, EngineError> {
        Ok(self.core.snap.list_checkpoints(name)?)
    }

    pub fn checkpoint(&self, name: &str, id: CheckpointId) -> Result<CheckpointInfo, EngineError> {
        Ok(self.core.snap.checkpoint(name, id)?)
    }

    /// Restores a checkpoint; returns the automatic checkpoint of the replaced head.
    pub async fn restore_checkpoint(
        &self,
        name: &str,
        id: CheckpointId,
        force: bool,
    ) -> Result<Timed<CheckpointInfo>, EngineError> {
        self.core.snap.checkpoint(name, id)?;
        let snap = self.core.snap.clone();
        let mut took = Duration::ZERO;
        let auto = self
            .exclusive(name, force, || {
                let t0 = Instant::now();
                let r = snap.restore(name, id);
                took = t0.elapsed();
                Ok(r?)
            })
            .await?;
        self.core.metrics.observe_admin("checkpoint_restore", took);
        Ok(Timed {
            value: auto,
            duration_us: took.as_micros() as u64,
        })
    }

    pub async fn delete_checkpoint(&self, name: &str, id: CheckpointId) -> Result<(), EngineError> {
        let t0 = Instant::now();
        self.core.snap.delete_checkpoint(name, id)?;
        self.core
            .metrics
            .observe_admin("checkpoint_delete", t0.elapsed());
        Ok(())
    }

    pub async fn flush(&self) -> Result<(), EngineError> {
        self.core.flush().await
    }

    /// One round of background work: GC/flattening, idle segments, reclamation, and a
    /// flush when releases have waited long enough for one.
    pub async fn background_round(&self) -> Result<(), EngineError> {
        while self.core.snap.has_background_work() {
            let snap = self.core.snap.clone();
            let r = tokio::task::spawn_blocking(move || snap.run_background_work())
                .await
                .map_err(|e| EngineError::Internal(format!("background task: {e}")))??;
            if let Some(r) = r {
                self.core.reclaim.released(r);
            }
        }
        self.core.queue_idle_segments();
        let stale = self.core.last_flush.lock().elapsed() >= Duration::from_secs(1);
        if self.core.reclaim.has_not_durable() && stale {
            self.core.flush().await?;
        }
        self.core.reclaim_ready().await;
        Ok(())
    }

    /// Runs background rounds until `shutdown` is cancelled.
    pub async fn run_background(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.background_round().await {
                tracing::warn!("background work failed (will retry): {e}");
            }
        }
    }

    /// Flushes and finishes reclamation (clean shutdown).
    pub async fn shutdown(&self) -> Result<(), EngineError> {
        self.core.flush().await?;
        self.background_round().await?;
        self.core.flush().await?;
        self.core.reclaim_ready().await;
        Ok(())
    }
}

impl Slot {
    fn volume_deleted(&self) -> bool {
        self.volume.is_deleted()
    }
}
