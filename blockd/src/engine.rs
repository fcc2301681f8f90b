//! `Engine`: the daemon's volumes. Opens the metadata engine and the segment store under one
//! data directory, hands out `Volume`s to front ends (attachments), runs admin operations
//! with the documented semantics for attached volumes, and drives background work (GC,
//! flattening, reclamation).
//!
//! Attached volumes: restore and delete refuse while clients are attached unless `force`,
//! which cancels the attachments' session (front ends close those connections), waits for
//! them to go, flushes, and then proceeds. Checkpoint create and clone never need clients
//! to leave: the checkpoint covers every write acknowledged before the request.
//!
//! Attach modes (docs/blockd.md, "Attachments"): NBD connections attach
//! [`AttachMode::Shared`] (any number at once: multi-conn), a VM over vhost-user attaches
//! [`AttachMode::Exclusive`] (the only attachment of the volume). An exclusive attachment is
//! refused while any other exists, and every attachment is refused while an exclusive one
//! exists, so an NBD client and a VM never write (or read a half-written view of) the same
//! volume at once.

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
    /// Per volume: bytes of the head's in-memory block-mapping cache (0: off).
    pub head_cache_bytes: usize,
    /// How long a forced restore/delete waits for attached clients to disconnect.
    pub detach_timeout: Duration,
    /// The object-store tier (none: local only).
    pub remote: Option<crate::objects::RemoteSetup>,
    /// Rewrite fragmented ranges in block order when they are read (see [`crate::defrag`]).
    pub defrag_on_read: bool,
}

impl EngineConfig {
    pub fn new(data_dir: &Path) -> EngineConfig {
        EngineConfig {
            data_dir: data_dir.to_path_buf(),
            local: LocalConfig::default(),
            meta_cache_bytes: 256 << 20,
            max_read_depth: 4,
            head_cache_bytes: 16 << 20,
            detach_timeout: Duration::from_secs(30),
            remote: None,
            defrag_on_read: true,
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
    /// Object-store billing (zeros without an object store).
    #[serde(flatten)]
    pub stored: crate::objects::StoredBytes,
}

/// Bytes per append stream (one stream per volume).
struct StreamSizes {
    local: std::collections::HashMap<u64, u64>,
    stored: std::collections::HashMap<u64, u64>,
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
    /// An exclusive (vhost-user) attachment holds the volume. Changed with `attach_lock`.
    exclusive: AtomicBool,
    /// Serializes attach/detach decisions with each other and with `exclusive()`.
    attach_lock: Mutex<()>,
    session: Mutex<CancellationToken>,
    transitioning: AtomicBool,
    detached: tokio::sync::Notify,
}

/// One front-end connection's hold on a volume. Dropping it detaches.
#[derive(Debug)]
pub struct AttachGuard {
    slot: Arc<Slot>,
    mode: AttachMode,
}

impl Drop for AttachGuard {
    fn drop(&mut self) {
        let _l = self.slot.attach_lock.lock();
        if self.mode == AttachMode::Exclusive {
            self.slot.exclusive.store(false, Ordering::Release);
        }
        self.slot.clients.fetch_sub(1, Ordering::AcqRel);
        self.slot.detached.notify_waiters();
    }
}

/// How a front end holds a volume (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// NBD connections: any number at once, none while an exclusive attachment exists.
    Shared,
    /// A VM over vhost-user: the volume's only attachment.
    Exclusive,
}

/// What happened to a volume, for [`Engine::on_volume_event`] observers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeEvent {
    /// Created or cloned.
    Created,
    Deleted,
}

type VolumeHook = Box<dyn Fn(&str, VolumeEvent) + Send + Sync>;

#[derive(Debug)]
pub struct Attached {
    pub volume: Arc<Volume>,
    /// Cancelled when the daemon needs the client gone (forced restore/delete).
    pub session: CancellationToken,
    pub guard: AttachGuard,
}

pub struct Engine {
    pub core: Arc<Core>,
    pub(crate) objects: Option<crate::objects::Objects>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    cfg: EngineConfig,
    hooks: parking_lot::RwLock<Vec<VolumeHook>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("core", &self.core)
            .field("slots", &self.slots)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
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
                head_cache_bytes: cfg.head_cache_bytes,
            },
        )?;
        let local = LocalStore::open(&cfg.data_dir.join("segments"), cfg.local.clone())?;
        // Segments nothing references (appends that never committed before a crash, or
        // emptied ones whose deletion was interrupted) go now; the database is durable.
        let live: std::collections::HashSet<u64> =
            snap.group_refs().keys().map(|chunk| chunk >> 8).collect();
        for id in local.segment_ids() {
            if !live.contains(&id) {
                local.remove_segment(id)?;
            }
        }
        local.take_idle();
        local.trim_tails();
        let objects = match cfg.remote.clone() {
            Some(setup) => Some(crate::objects::Objects::open(setup, &cfg.data_dir, &local)?),
            None => None,
        };
        let core = Arc::new(Core {
            snap,
            local,
            reclaim: Reclaimer::default(),
            metrics: Metrics::default(),
            last_flush: Mutex::new(Instant::now()),
            flushes: Default::default(),
            fenced: Default::default(),
            defrag: crate::defrag::Defrag::new(cfg.defrag_on_read),
        });
        Ok(Arc::new(Engine {
            core,
            objects,
            slots: Mutex::new(HashMap::new()),
            cfg,
            hooks: parking_lot::RwLock::new(Vec::new()),
        }))
    }

    pub fn data_dir(&self) -> &Path {
        &self.cfg.data_dir
    }

    pub fn snapshotter(&self) -> &Snapshotter {
        &self.core.snap
    }

    /// Whether an object store is configured (volumes can be synced and imported).
    pub fn has_object_store(&self) -> bool {
        self.objects.is_some()
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
            exclusive: AtomicBool::new(false),
            attach_lock: Mutex::new(()),
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

    /// Attaches an NBD connection to a volume ([`AttachMode::Shared`]).
    pub fn attach(&self, name: &str) -> Result<Attached, EngineError> {
        self.attach_mode(name, AttachMode::Shared)
    }

    /// Attaches a front-end connection to a volume, refusing what the attach rule forbids
    /// (see the module doc) with [`EngineError::AttachConflict`].
    pub fn attach_mode(&self, name: &str, mode: AttachMode) -> Result<Attached, EngineError> {
        let slot = self.slot(name)?;
        let _l = slot.attach_lock.lock();
        if slot.transitioning.load(Ordering::Acquire) {
            return Err(EngineError::Transitioning(name.to_string()));
        }
        let clients = slot.clients.load(Ordering::Acquire);
        let vm = slot.exclusive.load(Ordering::Acquire);
        let conflict = |holder: String, hint: &str| EngineError::AttachConflict {
            name: name.to_string(),
            holder,
            hint: hint.to_string(),
        };
        match mode {
            AttachMode::Shared if vm => {
                return Err(conflict(
                    "a VM over vhost-user, which has exclusive access".into(),
                    "stop the VM first, or read a checkpoint through a clone (volume clone NAME@CHECKPOINT NEW)",
                ));
            }
            AttachMode::Exclusive if vm => {
                return Err(conflict(
                    "another VM over vhost-user".into(),
                    "a volume serves one VM at a time",
                ));
            }
            AttachMode::Exclusive if clients > 0 => {
                return Err(conflict(
                    format!("{clients} NBD connection(s)"),
                    "a VM needs exclusive access: disconnect them first",
                ));
            }
            _ => {}
        }
        if mode == AttachMode::Exclusive {
            slot.exclusive.store(true, Ordering::Release);
        }
        slot.clients.fetch_add(1, Ordering::AcqRel);
        let session = slot.session.lock().clone();
        Ok(Attached {
            volume: slot.volume.clone(),
            session,
            guard: AttachGuard {
                slot: slot.clone(),
                mode,
            },
        })
    }

    /// Registers an observer of volume creation and deletion (called synchronously after
    /// the change is committed; the vhost-user server creates and removes sockets).
    pub fn on_volume_event(&self, hook: impl Fn(&str, VolumeEvent) + Send + Sync + 'static) {
        self.hooks.write().push(Box::new(hook));
    }

    pub(crate) fn volume_event(&self, name: &str, event: VolumeEvent) {
        for h in self.hooks.read().iter() {
            h(name, event);
        }
    }

    pub fn attached_clients(&self, name: &str) -> usize {
        self.slots
            .lock()
            .get(name)
            .map_or(0, |s| s.clients.load(Ordering::Acquire))
    }

    pub fn create_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeStat, EngineError> {
        let info = self.core.snap.create_volume(name, size_bytes)?;
        self.volume_event(name, VolumeEvent::Created);
        Ok(self.stat_of(info))
    }

    pub fn list_volumes(&self) -> Vec<VolumeStat> {
        let sizes = self.stream_sizes();
        self.core
            .snap
            .list_volumes()
            .into_iter()
            .map(|i| self.stat_with(i, &sizes))
            .collect()
    }

    pub fn stat(&self, name: &str) -> Result<VolumeStat, EngineError> {
        Ok(self.stat_of(self.core.snap.stat(name)?))
    }

    fn stat_of(&self, info: VolumeInfo) -> VolumeStat {
        self.stat_with(info, &self.stream_sizes())
    }

    /// Local and stored bytes of every append stream, gathered in one pass for all volumes.
    fn stream_sizes(&self) -> StreamSizes {
        StreamSizes {
            local: self.core.local.allocated_bytes_by_stream(),
            stored: self.stored_bytes_by_stream(),
        }
    }

    fn stat_with(&self, info: VolumeInfo, sizes: &StreamSizes) -> VolumeStat {
        let stored = sizes.stored.get(&info.stream).copied().unwrap_or(0);
        VolumeStat {
            local_bytes: sizes.local.get(&info.stream).copied().unwrap_or(0),
            attached_clients: self.attached_clients(&info.name),
            stored: crate::objects::StoredBytes::split(stored, &info),
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
        {
            let _l = slot.attach_lock.lock();
            if slot.transitioning.swap(true, Ordering::AcqRel) {
                return Err(EngineError::Transitioning(name.to_string()));
            }
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
        let stream = snap.stat(name)?.stream;
        self.exclusive(name, force, || Ok(snap.delete_volume(name)?))
            .await?;
        // Its active segment takes no more writes: seal it so it can go once empty.
        self.core.local.seal_stream(stream);
        self.forget_remote_volume(name).await?;
        self.slots.lock().remove(name);
        self.core.metrics.forget_volume(name);
        self.volume_event(name, VolumeEvent::Deleted);
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
        self.volume_event(new_name, VolumeEvent::Created);
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
        self.objects_round().await?;
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
        self.core.defrag.idle().await;
        let (moved, kept) = self.core.defrag.totals();
        if moved + kept > 0 {
            tracing::info!(
                "defragmentation on read moved {} MiB, kept {} MiB in place, skipped {} MiB (busy)",
                moved >> 20,
                kept >> 20,
                self.core.defrag.busy_bytes() >> 20
            );
        }
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
