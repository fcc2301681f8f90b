//! The object-store tier against an in-memory store: upload, eviction, lazy fetch (with
//! readahead and single-flight), dedup, dirty-data backpressure and GC.

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use chunkstore::tier::{ManifestRefs, Tier, TierConfig};
use chunkstore::{AlignedBuf, Appended, ChunkId, LocalConfig, LocalStore, ReadReq};
use object_store::ObjectStore;
use object_store::memory::InMemory;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

fn pattern(blocks: usize, seed: u8) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(blocks * 4096);
    for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
        let block = (i / 4096) as u32;
        *x = (block.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed.wrapping_mul(31) ^ (i as u8);
    }
    b
}

/// Where an append went. Dropping the `Appended` marks it committed (as blockd does after
/// its map commit): only then may its segment be uploaded.
struct Written {
    runs: Vec<(chunkstore::BlockAddr, u32)>,
    crcs: Vec<u32>,
}

async fn append(e: &Env, stream: u64, data: AlignedBuf) -> Written {
    let a: Appended = e.local.append(stream, Arc::new(data)).await.unwrap();
    Written {
        runs: a.runs.clone(),
        crcs: a.crcs.clone(),
    }
}

struct Env {
    _dir: tempfile::TempDir,
    local: Arc<LocalStore>,
    tier: Arc<Tier>,
    store: Arc<InMemory>,
}

fn env_with(store: Arc<InMemory>, cfg: TierConfig) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let local = Arc::new(
        LocalStore::open(
            &dir.path().join("segments"),
            LocalConfig {
                segment_bytes: 2 << 20, // two chunks per segment
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let tier = Arc::new(
        Tier::open(
            &dir.path().join("tier"),
            store.clone(),
            "bucket".into(),
            cfg,
        )
        .unwrap(),
    );
    local.attach_tier(tier.clone()).unwrap();
    Env {
        _dir: dir,
        local,
        tier,
        store,
    }
}

fn env(cfg: TierConfig) -> Env {
    env_with(Arc::new(InMemory::new()), cfg)
}

async fn upload_all(e: &Env) {
    e.local.seal_active();
    for seg in e.local.upload_candidates().unwrap() {
        e.tier
            .upload_segment(&e.local, &seg, &|_| true)
            .await
            .unwrap();
    }
}

async fn read(e: &Env, a: &Written) -> Vec<u8> {
    let mut reqs = Vec::new();
    let mut at = 0;
    for (addr, n) in &a.runs {
        reqs.push(ReadReq {
            addr: *addr,
            blocks: *n,
            out_block: at,
        });
        at += *n as usize;
    }
    let (out, r) = e
        .local
        .read_verified(&reqs, &a.crcs, AlignedBuf::zeroed(at * 4096))
        .await;
    r.unwrap();
    out.as_slice().to_vec()
}

async fn object_count(s: &InMemory) -> usize {
    use futures::StreamExt;
    s.list(None).collect::<Vec<_>>().await.len()
}

#[tokio::test]
async fn upload_evict_and_read_back_lazily() {
    let e = env(TierConfig {
        cache_bytes: 0,
        ..Default::default()
    });
    let mut written = Vec::new();
    for seed in 0..6u8 {
        let data = pattern(128, seed); // 512 KiB each: 3 MiB over two-chunk segments
        let expect = data.as_slice().to_vec();
        written.push((append(&e, 7, data).await, expect));
    }
    assert!(e.local.dirty_bytes() >= 3 << 20);
    upload_all(&e).await;
    assert_eq!(e.local.dirty_bytes(), 0);
    assert!(object_count(&e.store).await >= 3);
    // Not covered by a manifest yet: not clean, never evicted.
    assert_eq!(e.tier.evict_round(&e.local).unwrap(), 0);
    let chunks: Vec<u64> = e
        .tier
        .meta()
        .segs()
        .unwrap()
        .iter()
        .flat_map(|(seg, _)| e.tier.meta().seg_chunks(*seg).unwrap())
        .map(|(c, _)| c)
        .collect();
    e.tier.manifest_chunks(&e.local, &chunks).await.unwrap();
    let evicted = e.tier.evict_round(&e.local).unwrap();
    assert!(evicted >= 3 << 20, "evicted {evicted}");
    assert!(e.local.allocated_bytes() < 1 << 20);
    // Reads fetch frames back, verified.
    for (a, expect) in &written {
        assert_eq!(&read(&e, a).await, expect);
    }
    let fetches = e.tier.stats.fetches.load(Relaxed);
    assert!(fetches > 0);
    // Second pass: all cached, no new fetches.
    for (a, expect) in &written {
        assert_eq!(&read(&e, a).await, expect);
    }
    assert_eq!(e.tier.stats.fetches.load(Relaxed), fetches);
}

#[tokio::test]
async fn identical_chunks_are_stored_once() {
    let e = env(TierConfig::default());
    for stream in [1u64, 2] {
        append(&e, stream, pattern(512, 3)).await;
    }
    upload_all(&e).await;
    assert_eq!(
        object_count(&e.store).await,
        2,
        "two identical 1 MiB chunks per stream, stored once"
    );
    assert_eq!(e.tier.stats.dedup_chunks.load(Relaxed), 2);
    assert!(e.tier.stored_bytes_by_stream().unwrap()[&1] > 0);
}

#[tokio::test]
async fn dead_chunks_are_not_uploaded_and_released_objects_are_deleted() {
    let e = env(TierConfig {
        gc_grace: Duration::ZERO,
        ..Default::default()
    });
    let a = append(&e, 1, pattern(512, 1)).await;
    let first = a.runs[0].0.chunk().0;
    e.local.seal_active();
    for seg in e.local.upload_candidates().unwrap() {
        // The first chunk is already dead: skipped.
        e.tier
            .upload_segment(&e.local, &seg, &|c| c != first)
            .await
            .unwrap();
    }
    assert_eq!(object_count(&e.store).await, 1);
    let second = ChunkId(first.0 + 1);
    e.tier.release_chunk(second).unwrap();
    assert_eq!(e.tier.gc_round(&|_| ManifestRefs::None).await.unwrap(), 1);
    assert_eq!(object_count(&e.store).await, 0);
}

#[tokio::test]
async fn objects_another_host_needs_are_kept() {
    let e = env(TierConfig {
        gc_grace: Duration::ZERO,
        ..Default::default()
    });
    let a = append(&e, 1, pattern(256, 9)).await;
    upload_all(&e).await;
    e.tier.release_chunk(a.runs[0].0.chunk().0).unwrap();
    assert_eq!(
        e.tier.gc_round(&|_| ManifestRefs::OtherHost).await.unwrap(),
        0
    );
    assert_eq!(object_count(&e.store).await, 1);
}

#[tokio::test]
async fn objects_this_hosts_stale_manifest_references_wait_for_the_next_round() {
    let e = env(TierConfig {
        gc_grace: Duration::ZERO,
        ..Default::default()
    });
    let a = append(&e, 1, pattern(256, 7)).await;
    upload_all(&e).await;
    e.tier.release_chunk(a.runs[0].0.chunk().0).unwrap();
    // Still in this host's last manifest: kept, and the deletion stays scheduled...
    assert_eq!(
        e.tier.gc_round(&|_| ManifestRefs::ThisHost).await.unwrap(),
        0
    );
    assert_eq!(object_count(&e.store).await, 1);
    // ...so once a sync replaced that manifest, the object goes.
    assert_eq!(e.tier.gc_round(&|_| ManifestRefs::None).await.unwrap(), 1);
    assert_eq!(object_count(&e.store).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_when_dirty_data_hits_the_limit() {
    let e = env(TierConfig {
        dirty_limit: 1 << 20,
        ..Default::default()
    });
    append(&e, 1, pattern(256, 1)).await; // 1 MiB: at the limit
    let local = e.local.clone();
    let blocked =
        tokio::spawn(async move { local.append(1, Arc::new(pattern(16, 2))).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !blocked.is_finished(),
        "a write above the dirty limit must wait"
    );
    upload_all(&e).await;
    tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_fresh_host_reads_from_the_store_alone() {
    let e = env(TierConfig::default());
    let a = append(&e, 5, pattern(300, 4)).await;
    let expect = pattern(300, 4).as_slice().to_vec();
    upload_all(&e).await;
    // The layouts a manifest would carry.
    let mut chunks = Vec::new();
    let mut segs = Vec::new();
    for (seg, rec) in e.tier.meta().segs().unwrap() {
        chunks.extend(e.tier.meta().seg_chunks(seg).unwrap());
        segs.push((seg, rec));
    }
    let f = env_with(e.store.clone(), TierConfig::default());
    f.tier.meta().import_chunks(&chunks, &segs).unwrap();
    assert!(f.local.segment_ids().is_empty());
    assert_eq!(read(&f, &a).await, expect);
    // Objects really were fetched, and the read made the segments appear locally.
    assert!(f.tier.stats.fetches.load(Relaxed) > 0);
    assert!(!f.local.segment_ids().is_empty());
}

#[tokio::test]
async fn a_vanished_object_is_uploaded_again_before_a_manifest_references_it() {
    use object_store::ObjectStoreExt;
    let e = env(TierConfig::default());
    let a = append(&e, 3, pattern(64, 5)).await;
    upload_all(&e).await;
    let chunk = a.runs[0].0.chunk().0;
    let layout = e.tier.meta().chunk(chunk.0).unwrap().unwrap();
    let key = e.tier.key(&format!("chunks/{}", layout.hash));
    e.store.delete(&key).await.unwrap(); // another host's GC, say
    e.tier.manifest_chunks(&e.local, &[chunk.0]).await.unwrap();
    assert!(e.store.head(&key).await.is_ok(), "re-uploaded");
    assert!(e.tier.meta().manifested(chunk.0).unwrap());
}
