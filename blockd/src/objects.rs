//! The engine's object-store side (docs/object-tier.md): background upload, eviction and
//! object GC; the sync barrier (data, map pages, manifest); import of a volume from the
//! bucket (cold open); fencing with leases; stored-bytes billing.

use crate::engine::{Engine, VolumeEvent};
use crate::error::EngineError;
use crate::manifest::{MANIFEST_FORMAT, Manifest, Page, PageRef};
use chunkstore::remote::{Lease, LeaseError, Remote};
use chunkstore::tier::{ManifestRefs, Tier, TierConfig};
use chunkstore::{ChunkId, MAX_SEGMENT_BYTES};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parking_lot::Mutex;
#[allow(unused_imports)]
use parking_lot::Mutex as _PlMutex;
use serde::Serialize;
use snapshotter::{MapValue, TimelineId, Version};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the engine needs to run the object-store tier.
#[derive(Debug, Clone)]
pub struct RemoteSetup {
    pub remote: Remote,
    pub tier: TierConfig,
    /// How often held leases are checked (a taken-over volume stops accepting writes).
    pub lease_check: Duration,
}

/// Per daemon state of the tier.
pub struct Objects {
    pub remote: Remote,
    pub tier: Arc<Tier>,
    /// This daemon's identity in leases and manifests.
    pub owner: String,
    leases: tokio::sync::Mutex<HashMap<String, Lease>>,
    /// Chunk hashes referenced by each map page (pages are immutable: cached forever).
    page_chunks: Mutex<HashMap<String, Vec<String>>>,
    last_lease_check: Mutex<Instant>,
    lease_check: Duration,
    /// Serialises syncs (one barrier at a time).
    sync_lock: tokio::sync::Mutex<()>,
    /// Serialises uploads (the background round and sync both upload): a segment uploaded
    /// twice at once would be recorded twice, counting two references to each of its
    /// objects, which then never reach zero and are never collected.
    upload_lock: tokio::sync::Mutex<()>,
    /// Requests, errors, latency and bytes of every call to the object store.
    pub store_metrics: Arc<chunkstore::remote::StoreMetrics>,
    /// Sealed segments waiting for upload and when they were first seen waiting (unix ms).
    waiting_since: Mutex<HashMap<u64, u64>>,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Objects")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// `volume sync` result.
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    pub name: String,
    pub segments_uploaded: usize,
    pub pages: usize,
    pub pages_uploaded: usize,
    pub manifest_bytes: usize,
    pub lease_generation: u64,
    pub duration_ms: u64,
}

/// `volume import` result.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    pub name: String,
    pub from: String,
    pub timelines: usize,
    pub pages: usize,
    pub entries: usize,
    pub metadata_bytes: u64,
    pub lease_generation: u64,
    pub duration_ms: u64,
}

/// Billing of the object store for one volume.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StoredBytes {
    /// Compressed bytes of the chunks holding the volume's own blocks.
    pub stored_bytes: u64,
    /// Of those, in proportion to head-owned blocks.
    pub stored_head_bytes: u64,
    /// And to checkpoint-only blocks.
    pub stored_checkpoint_only_bytes: u64,
}

impl StoredBytes {
    /// Splits a volume's stored bytes between head and checkpoints in proportion to the
    /// blocks each owns.
    pub fn split(stored: u64, info: &snapshotter::VolumeInfo) -> StoredBytes {
        let owned = info.owned_bytes.max(1);
        let head_owned = info.owned_bytes - info.checkpoint_only_bytes;
        let head = (stored as u128 * head_owned as u128 / owned as u128) as u64;
        StoredBytes {
            stored_bytes: stored,
            stored_head_bytes: head,
            stored_checkpoint_only_bytes: stored - head,
        }
    }
}

/// Reads of a metadata object that fails to decode before it is called corrupt.
const READ_ATTEMPTS: usize = 4;

fn lease_err(name: &str, e: LeaseError) -> EngineError {
    match e {
        LeaseError::HeldBy { owner, generation } => EngineError::Fenced(format!(
            "volume {name:?} is held by daemon {owner:?} (lease generation {generation}); import it with --force to take it over"
        )),
        LeaseError::Stale {
            current_owner,
            current_generation,
            ..
        } => EngineError::Fenced(format!(
            "volume {name:?} was taken over by daemon {current_owner:?} (lease generation {current_generation}); this daemon may no longer write it"
        )),
        e => EngineError::Remote(format!("lease of {name:?}: {e}")),
    }
}

impl Objects {
    pub fn open(
        setup: RemoteSetup,
        data_dir: &std::path::Path,
        local: &chunkstore::LocalStore,
    ) -> Result<Objects, EngineError> {
        let store_metrics = chunkstore::remote::StoreMetrics::new();
        let remote = setup.remote.metered(store_metrics.clone());
        let tier = Arc::new(Tier::open(
            &data_dir.join("tier"),
            remote.store.clone(),
            remote.prefix.clone(),
            setup.tier,
        )?);
        local.attach_tier(tier.clone())?;
        Ok(Objects {
            owner: format!("blockd-{}", local.instance()),
            remote,
            tier,
            leases: tokio::sync::Mutex::new(HashMap::new()),
            page_chunks: Mutex::new(HashMap::new()),
            last_lease_check: Mutex::new(Instant::now()),
            lease_check: setup.lease_check,
            sync_lock: tokio::sync::Mutex::new(()),
            upload_lock: tokio::sync::Mutex::new(()),
            store_metrics,
            waiting_since: Mutex::new(HashMap::new()),
        })
    }

    /// Upload lag: records when each sealed segment (by id) was first seen waiting for upload and
    /// publishes the oldest (`TierStats::oldest_dirty_ms`, 0 when nothing waits).
    fn note_upload_lag(&self, waiting: &[u64]) {
        let now = chunkstore::tier::now_ms();
        let mut since = self.waiting_since.lock();
        since.retain(|id, _| waiting.contains(id));
        for id in waiting {
            since.entry(*id).or_insert(now);
        }
        let oldest = since.values().copied().min().unwrap_or(0);
        self.tier
            .stats
            .oldest_dirty_ms
            .store(oldest, std::sync::atomic::Ordering::Relaxed);
    }

    fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.remote.store
    }

    /// Manifests of a volume live at `volumes/<name>/manifest/<generation>-<seq>` (both
    /// zero-padded), written create-if-absent: the newest generation wins, so a manifest
    /// written late by a daemon whose lease was taken over is never read.
    fn manifest_dir(&self, name: &str) -> object_store::path::Path {
        self.remote.key(&format!("volumes/{name}/manifest"))
    }

    fn manifest_key(&self, name: &str, generation: u64, seq: u64) -> object_store::path::Path {
        self.remote.key(&format!(
            "volumes/{name}/manifest/{generation:020}-{seq:020}"
        ))
    }

    /// The manifest objects of a volume, newest first.
    async fn list_manifests(
        &self,
        name: &str,
    ) -> Result<Vec<object_store::path::Path>, EngineError> {
        let mut v: Vec<object_store::path::Path> = self
            .list(&self.manifest_dir(name))
            .await?
            .into_iter()
            .map(|m| m.location)
            .collect();
        v.sort_by(|a, b| b.as_ref().cmp(a.as_ref()));
        Ok(v)
    }

    /// Lists a prefix (retrying transient failures of the whole listing).
    async fn list(
        &self,
        prefix: &object_store::path::Path,
    ) -> Result<Vec<object_store::ObjectMeta>, EngineError> {
        use futures::TryStreamExt;
        Ok(self
            .tier
            .retry("list", || {
                self.store().list(Some(prefix)).try_collect::<Vec<_>>()
            })
            .await?)
    }

    fn lease_key(&self, name: &str) -> object_store::path::Path {
        self.remote.key(&format!("volumes/{name}/lease"))
    }

    fn page_key(&self, hash: &str) -> object_store::path::Path {
        self.remote.key(&format!("meta/{hash}"))
    }

    async fn claim(&self, name: &str, force: bool) -> Result<u64, EngineError> {
        let lease = Lease::acquire(
            self.store().clone(),
            self.lease_key(name),
            &self.owner,
            force,
        )
        .await
        .map_err(|e| lease_err(name, e))?;
        let generation = lease.generation();
        self.leases.lock().await.insert(name.to_string(), lease);
        Ok(generation)
    }

    async fn read_manifest(&self, name: &str) -> Result<Option<(Manifest, u64)>, EngineError> {
        'keys: for key in self.list_manifests(name).await? {
            // A body that does not decode may have been damaged in transit: read again.
            let mut last = String::new();
            for _ in 0..READ_ATTEMPTS {
                let got = self
                    .tier
                    .retry("read manifest", || async {
                        self.store().get(&key).await?.bytes().await
                    })
                    .await;
                let bytes = match got {
                    Ok(b) => b,
                    // Deleted by its writer after a newer one landed: take the next.
                    Err(chunkstore::Error::ObjectNotFound(_)) => continue 'keys,
                    Err(e) => return Err(e.into()),
                };
                match Manifest::decode(&bytes) {
                    Ok(m) => return Ok(Some((m, bytes.len() as u64))),
                    Err(e) => last = e.to_string(),
                }
            }
            return Err(EngineError::Remote(format!("manifest {key}: {last}")));
        }
        Ok(None)
    }

    /// Writes a new manifest for `generation`, then drops the volume's older ones.
    async fn write_manifest(
        &self,
        name: &str,
        generation: u64,
        body: bytes::Bytes,
    ) -> Result<(), EngineError> {
        let older = self.list_manifests(name).await?;
        let mut seq = chunkstore::tier::now_ms();
        loop {
            let key = self.manifest_key(name, generation, seq);
            let put = self
                .tier
                .retry("write manifest", || {
                    self.store().put_opts(
                        &key,
                        PutPayload::from(body.clone()),
                        object_store::PutOptions::from(object_store::PutMode::Create),
                    )
                })
                .await;
            match put {
                Ok(_) => break,
                Err(chunkstore::Error::ObjectExists(_)) => {
                    // Ours if an attempt whose answer was lost stored it; else a clash.
                    let same = match self.store().get(&key).await {
                        Ok(r) => r.bytes().await.is_ok_and(|b| b == body),
                        Err(_) => false,
                    };
                    if same {
                        break;
                    }
                    seq += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        for key in older {
            let _ = self.store().delete(&key).await;
        }
        Ok(())
    }

    async fn get_page(&self, hash: &str) -> Result<(Page, u64), EngineError> {
        let key = self.page_key(hash);
        // Pages are content-addressed: a body whose hash does not match was damaged in
        // transit (read again) or in the store (an error after a few tries).
        for _ in 0..READ_ATTEMPTS {
            let bytes = self
                .tier
                .retry("read map page", || async {
                    self.store().get(&key).await?.bytes().await
                })
                .await?;
            if blake3::hash(&bytes).to_hex().as_str() != hash {
                continue;
            }
            let page = Page::decode(&bytes).map_err(|e| EngineError::Remote(e.to_string()))?;
            return Ok((page, bytes.len() as u64));
        }
        Err(EngineError::Remote(format!(
            "map page {hash} does not match its name (corrupt object)"
        )))
    }

    /// Chunk hashes the manifests in the bucket reference (for GC): those of volumes other
    /// hosts hold, and those of the volumes in `held` (this host's).
    async fn referenced_by_manifests(
        &self,
        held: &HashSet<String>,
    ) -> Result<(HashSet<String>, HashSet<String>), EngineError> {
        let objects = self.list(&self.remote.key("volumes")).await?;
        let (mut others, mut own) = (HashSet::new(), HashSet::new());
        for o in objects {
            // volumes/<name>/manifest/<generation>-<seq>: every one counts (a stale one
            // keeps objects alive a little longer, never the other way round).
            let parts: Vec<_> = o.location.parts().collect();
            let mut rev = parts.iter().rev();
            let (_, dir, volume) = (rev.next(), rev.next(), rev.next());
            if dir.is_none_or(|p| p.as_ref() != "manifest") {
                continue;
            }
            let out = if volume.is_some_and(|v| held.contains(v.as_ref())) {
                &mut own
            } else {
                &mut others
            };
            let mut decoded = None;
            for _ in 0..READ_ATTEMPTS {
                let got = self
                    .tier
                    .retry("read manifest", || async {
                        self.store().get(&o.location).await?.bytes().await
                    })
                    .await;
                match got {
                    Ok(bytes) => {
                        if let Ok(m) = Manifest::decode(&bytes) {
                            decoded = Some(m);
                            break;
                        }
                    }
                    Err(chunkstore::Error::ObjectNotFound(_)) => break,
                    Err(e) => return Err(e.into()),
                }
            }
            let Some(m) = decoded else {
                // Gone, or unreadable: GC must not act on a partial view.
                if self.store().head(&o.location).await.is_ok() {
                    return Err(EngineError::Remote(format!(
                        "manifest {} does not decode; not collecting objects",
                        o.location
                    )));
                }
                continue;
            };
            for p in m.pages.values().flatten() {
                let cached = self.page_chunks.lock().get(&p.hash).cloned();
                let hashes = match cached {
                    Some(h) => h,
                    None => {
                        let (page, _) = self.get_page(&p.hash).await?;
                        let h: Vec<String> =
                            page.chunks.iter().map(|(_, l)| l.hash.clone()).collect();
                        self.page_chunks.lock().insert(p.hash.clone(), h.clone());
                        h
                    }
                };
                out.extend(hashes);
            }
        }
        Ok((others, own))
    }
}

impl Engine {
    pub fn objects(&self) -> Option<&Objects> {
        self.objects.as_ref()
    }

    fn need_objects(&self) -> Result<&Objects, EngineError> {
        self.objects.as_ref().ok_or_else(|| {
            EngineError::Invalid("no object store is configured (object_store.url)".into())
        })
    }

    /// Creates a volume; with an object store, also takes its lease (refused if another
    /// daemon holds a volume of that name in the bucket).
    pub async fn create_volume_claimed(
        &self,
        name: &str,
        size_bytes: u64,
    ) -> Result<crate::engine::VolumeStat, EngineError> {
        if let Some(o) = &self.objects {
            if self.core.snap.stat(name).is_ok() {
                return Err(snapshotter::Error::VolumeExists(name.to_string()).into());
            }
            if o.read_manifest(name).await?.is_some() {
                return Err(EngineError::Invalid(format!(
                    "the object store already holds a volume {name:?}: import it instead"
                )));
            }
            o.claim(name, false).await?;
        }
        self.create_volume(name, size_bytes)
    }

    /// Refuses work on a volume another daemon took over.
    pub(crate) fn check_fence(&self, name: &str) -> Result<(), EngineError> {
        if self.core.fenced.read().contains(name) {
            return Err(EngineError::Fenced(format!(
                "volume {name:?} was taken over by another daemon; this daemon may no longer write it"
            )));
        }
        Ok(())
    }

    /// Background work of the tier: uploads, eviction, due object deletions, lease checks.
    pub(crate) async fn objects_round(&self) -> Result<(), EngineError> {
        let Some(o) = &self.objects else {
            return Ok(());
        };
        let local = &self.core.local;
        // Keep dirty data moving: past half the limit, seal active segments so they upload.
        if local.dirty_bytes() > o.tier.config().dirty_limit / 2 {
            local.seal_active();
        }
        self.upload_pending().await?;
        let evicted = o.tier.evict_round(local)?;
        if evicted > 0 {
            tracing::debug!(bytes = evicted, "evicted clean data");
        }
        if !o
            .tier
            .meta()
            .due_deletes(chunkstore::tier::now_ms())?
            .is_empty()
        {
            let fenced = self.core.fenced.read().clone();
            let held: HashSet<String> = o
                .leases
                .lock()
                .await
                .keys()
                .filter(|n| !fenced.contains(*n))
                .cloned()
                .collect();
            let (others, own) = o.referenced_by_manifests(&held).await?;
            let n = o
                .tier
                .gc_round(&|h| {
                    if others.contains(h) {
                        ManifestRefs::OtherHost
                    } else if own.contains(h) {
                        ManifestRefs::ThisHost
                    } else {
                        ManifestRefs::None
                    }
                })
                .await?;
            if n > 0 {
                tracing::info!(objects = n, "deleted unreferenced chunk objects");
            }
        }
        if o.last_lease_check.lock().elapsed() >= o.lease_check {
            *o.last_lease_check.lock() = Instant::now();
            let leases = o.leases.lock().await;
            for (name, lease) in leases.iter() {
                if let Err(e) = lease.check().await
                    && matches!(e, LeaseError::Stale { .. })
                {
                    tracing::error!(volume = %name, "lease lost: {e}; refusing further writes");
                    self.core.fenced.write().insert(name.clone());
                }
            }
        }
        Ok(())
    }

    /// Uploads every sealed segment with no append in flight.
    async fn upload_pending(&self) -> Result<usize, EngineError> {
        let Some(o) = &self.objects else { return Ok(0) };
        let local = &self.core.local;
        let snap = self.core.snap.clone();
        let live = move |c: ChunkId| snap.group_ref(c.0) > 0;
        let _one_uploader = o.upload_lock.lock().await;
        let waiting = local.upload_candidates()?;
        o.note_upload_lag(&waiting.iter().map(|s| s.id).collect::<Vec<_>>());
        for seg in &waiting {
            o.tier.upload_segment(local, seg, &live).await?;
        }
        // Everything that waited is up (segments sealed meanwhile are seen next time).
        o.note_upload_lag(&[]);
        Ok(waiting.len())
    }

    /// The sync barrier: when it returns, all the volume's data and a manifest for its
    /// head and every checkpoint are in the object store.
    pub async fn sync_volume(&self, name: &str) -> Result<SyncReport, EngineError> {
        let o = self.need_objects()?;
        let t0 = Instant::now();
        self.check_fence(name)?;
        let _serial = o.sync_lock.lock().await;
        self.core.snap.stat(name)?;
        self.core.flush().await?;
        // Seal everything and upload until nothing is left: segments with appends still in
        // flight become uploadable as soon as those commit.
        self.core.local.seal_active();
        let mut uploaded = 0;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            uploaded += self.upload_pending().await?;
            let waiting = self
                .core
                .local
                .segments()
                .into_iter()
                .filter(|s| !matches!(o.tier.uploaded(s.id), Ok(true)))
                .count();
            if waiting == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(EngineError::Remote(format!(
                    "{waiting} segment(s) could not be uploaded in time"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.core.local.seal_active();
        }
        // Map pages of every timeline the volume reads.
        let export = self.core.snap.export_volume(name)?;
        let mut pages: BTreeMap<u64, Vec<PageRef>> = BTreeMap::new();
        let mut chunks_all: BTreeSet<u64> = BTreeSet::new();
        let (mut npages, mut pages_up) = (0, 0);
        for t in &export.timelines {
            let tid = t.record.id;
            let mut refs = Vec::new();
            for first in self.core.snap.export_page_starts(tid)? {
                let entries = self.core.snap.export_page(tid, first)?;
                let mut chunk_ids = BTreeSet::new();
                for e in &entries {
                    let v = Version::decode(snapshotter::Seq(e.key_seq), &e.value)?;
                    if let MapValue::Owned { phys, .. } | MapValue::Borrowed { phys, .. } = v.value
                    {
                        chunk_ids.insert(phys.group);
                    }
                }
                let mut chunks = Vec::new();
                let mut segs = BTreeMap::new();
                for c in &chunk_ids {
                    let layout = o.tier.meta().chunk(*c)?.ok_or_else(|| {
                        EngineError::Remote(format!(
                            "chunk {c:x} of {name} is not in the object store"
                        ))
                    })?;
                    chunks.push((*c, layout));
                    let seg = c >> 8;
                    if let std::collections::btree_map::Entry::Vacant(v) = segs.entry(seg)
                        && let Some(rec) = o.tier.meta().seg(seg)?
                    {
                        v.insert(rec);
                    }
                }
                chunks_all.extend(chunk_ids);
                let page = Page {
                    timeline: tid.0,
                    first,
                    entries,
                    chunks,
                    segs: segs.into_iter().collect(),
                };
                let (bytes, hash) = page.encode();
                npages += 1;
                let key = o.page_key(&hash);
                if o.store().head(&key).await.is_err() {
                    let body = bytes::Bytes::from(bytes);
                    o.tier
                        .retry("upload map page", || {
                            o.store().put(&key, PutPayload::from(body.clone()))
                        })
                        .await?;
                    pages_up += 1;
                }
                refs.push(PageRef { first, hash });
            }
            pages.insert(tid.0, refs);
        }
        // The chunks are about to be referenced by a manifest: make sure their objects exist.
        let chunks: Vec<u64> = chunks_all.into_iter().collect();
        o.tier.manifest_chunks(&self.core.local, &chunks).await?;
        // Fencing: only the lease holder writes the manifest.
        let generation = {
            let leases = o.leases.lock().await;
            match leases.get(name) {
                Some(l) => {
                    l.check().await.map_err(|e| {
                        self.core.fenced.write().insert(name.to_string());
                        lease_err(name, e)
                    })?;
                    l.generation()
                }
                None => {
                    drop(leases);
                    o.claim(name, false).await?
                }
            }
        };
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            name: name.to_string(),
            writer: o.owner.clone(),
            lease_generation: generation,
            written_unix_ms: chunkstore::tier::now_ms(),
            export,
            pages,
        };
        let body = bytes::Bytes::from(manifest.encode());
        let len = body.len();
        fail::fail_point!("blockd::sync::before_manifest", |_| Err(
            EngineError::Internal("injected failure at blockd::sync::before_manifest".into())
        ));
        o.write_manifest(name, generation, body).await?;
        fail::fail_point!("blockd::sync::after_manifest", |_| Err(
            EngineError::Internal("injected failure at blockd::sync::after_manifest".into())
        ));
        let took = t0.elapsed();
        self.core.metrics.observe_admin("volume_sync", took);
        Ok(SyncReport {
            name: name.to_string(),
            segments_uploaded: uploaded,
            pages: npages,
            pages_uploaded: pages_up,
            manifest_bytes: len,
            lease_generation: generation,
            duration_ms: took.as_millis() as u64,
        })
    }

    /// Is there a volume of that name in the object store?
    pub async fn remote_volume_exists(&self, name: &str) -> Result<bool, EngineError> {
        match &self.objects {
            Some(o) => Ok(o.read_manifest(name).await?.is_some()),
            None => Ok(false),
        }
    }

    /// Opens a volume from the object store (cold open): downloads its manifest and map
    /// pages, installs them as `as_name`, takes the lease (`force` takes it over from
    /// another daemon). Data is fetched lazily on reads.
    pub async fn import_volume(
        &self,
        name: &str,
        as_name: Option<&str>,
        force: bool,
    ) -> Result<ImportReport, EngineError> {
        let o = self.need_objects()?;
        let t0 = Instant::now();
        let local_name = as_name.unwrap_or(name);
        if self.core.snap.stat(local_name).is_ok() {
            return Err(snapshotter::Error::VolumeExists(local_name.to_string()).into());
        }
        let (manifest, mut meta_bytes) = o.read_manifest(name).await?.ok_or_else(|| {
            snapshotter::Error::VolumeNotFound(format!("{name} (in the object store)"))
        })?;
        // Pages are fetched concurrently (in manifest order): the open costs a few round
        // trips, not one per page.
        use futures::StreamExt;
        let wanted: Vec<(u64, String)> = manifest
            .pages
            .iter()
            .flat_map(|(tid, refs)| refs.iter().map(move |r| (*tid, r.hash.clone())))
            .collect();
        let fetched: Vec<Result<(u64, Page, u64), EngineError>> = futures::stream::iter(wanted)
            .map(|(tid, hash): (u64, String)| async move {
                let (page, bytes) = o.get_page(&hash).await?;
                Ok((tid, page, bytes))
            })
            .buffered(PAGE_FETCH_CONCURRENCY)
            .collect()
            .await;
        let mut pages = Vec::with_capacity(fetched.len());
        for f in fetched {
            let (tid, page, bytes) = f?;
            meta_bytes += bytes;
            pages.push((tid, page));
        }
        // Blocks are owned by one volume of this host: a second import of data this host
        // already has (its own volume, or one imported before, also as a clone source)
        // would give two volumes the same blocks, and releasing them in one (trim, delete)
        // would destroy them in the other.
        // A chunk record no local block references is not such data: it is left by an
        // import that crashed before installing the volume (chunk records and the volume's
        // metadata live in two databases), and installing it again is safe (records that
        // exist are kept, their object references are not counted twice).
        for (_, page) in &pages {
            for (c, _) in &page.chunks {
                if o.tier.meta().chunk(*c)?.is_some() && self.core.snap.group_ref(*c) > 0 {
                    return Err(EngineError::Invalid(format!(
                        "this daemon already has data of volume {name:?} (it wrote the volume \
                         or imported it before, maybe as a clone source): import it on another \
                         daemon, or clone a checkpoint of the local copy"
                    )));
                }
            }
        }
        // Take the lease before opening: a daemon that cannot write the volume does not
        // open it.
        let generation = o.claim(local_name, force).await?;
        self.core.fenced.write().remove(local_name);
        let mut entries: HashMap<u64, Vec<snapshotter::EntryExport>> = HashMap::new();
        let (npages, mut nentries) = (pages.len(), 0);
        for (tid, page) in pages {
            o.tier.meta().import_chunks(&page.chunks, &page.segs)?;
            nentries += page.entries.len();
            entries.entry(tid).or_default().extend(page.entries);
        }
        fail::fail_point!("blockd::import::before_install", |_| Err(
            EngineError::Internal("injected failure at blockd::import::before_install".into())
        ));
        let mut take = |t: TimelineId| Ok(entries.remove(&t.0).unwrap_or_default());
        self.core
            .snap
            .import_volume(local_name, &manifest.export, &mut take)?;
        self.volume_event(local_name, VolumeEvent::Created);
        let took = t0.elapsed();
        self.core.metrics.observe_admin("volume_import", took);
        Ok(ImportReport {
            name: local_name.to_string(),
            from: name.to_string(),
            timelines: manifest.export.timelines.len(),
            pages: npages,
            entries: nentries,
            metadata_bytes: meta_bytes,
            lease_generation: generation,
            duration_ms: took.as_millis() as u64,
        })
    }

    /// After deleting a volume: its manifest and lease go too (its chunks are then
    /// collected once nothing else references them).
    pub(crate) async fn forget_remote_volume(&self, name: &str) -> Result<(), EngineError> {
        let Some(o) = &self.objects else {
            return Ok(());
        };
        let lease = o.leases.lock().await.remove(name);
        self.core.fenced.write().remove(name);
        let Some(lease) = lease else { return Ok(()) };
        // Only the lease holder removes the volume from the bucket; a daemon that lost the
        // lease deletes its local copy only.
        match lease.check().await {
            Ok(()) => {}
            Err(chunkstore::remote::LeaseError::Stale { .. }) => return Ok(()),
            Err(e) => {
                return Err(EngineError::Remote(format!(
                    "volume {name:?} was deleted locally but its lease cannot be checked ({e}); \
                     its manifests stay in the object store"
                )));
            }
        }
        for key in o.list_manifests(name).await? {
            match o
                .tier
                .retry("delete manifest", || o.store().delete(&key))
                .await
            {
                Ok(()) | Err(chunkstore::Error::ObjectNotFound(_)) => {}
                Err(e) => {
                    return Err(EngineError::Remote(format!(
                        "volume {name:?} was deleted locally but manifest {key} cannot be \
                         deleted from the object store: {e}"
                    )));
                }
            }
        }
        if let Err(e) = lease.release().await {
            tracing::warn!(volume = %name, "deleted volume's lease not released: {e}");
        }
        Ok(())
    }

    /// Takes a local volume's lease (with `force`, from whichever daemon holds it): the
    /// volume accepts writes again. Used after another daemon gave it back or crashed.
    pub async fn claim_volume(&self, name: &str, force: bool) -> Result<u64, EngineError> {
        let o = self.need_objects()?;
        self.core.snap.stat(name)?;
        let generation = o.claim(name, force).await?;
        self.core.fenced.write().remove(name);
        Ok(generation)
    }

    /// Takes the leases of the local volumes again after a restart.
    pub async fn reclaim_leases(&self) {
        let Some(o) = &self.objects else { return };
        for v in self.core.snap.list_volumes() {
            if let Err(e) = o.claim(&v.name, false).await {
                tracing::error!(volume = %v.name, "cannot take the lease back: {e}; writes are refused");
                self.core.fenced.write().insert(v.name.clone());
            }
        }
    }

    /// Bytes each append stream holds in the object store (empty without one).
    pub(crate) fn stored_bytes_by_stream(&self) -> HashMap<u64, u64> {
        self.objects
            .as_ref()
            .and_then(|o| o.tier.stored_bytes_by_stream().ok())
            .unwrap_or_default()
    }
}

/// Segment size the tier supports (chunk ids hold 256 chunks per segment).
pub const MAX_SEGMENT: u64 = MAX_SEGMENT_BYTES;

/// Map pages fetched at once by an import.
const PAGE_FETCH_CONCURRENCY: usize = 16;
