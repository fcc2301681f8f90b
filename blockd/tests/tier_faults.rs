//! A store that fails every request: reads that need it fail with an I/O error, everything
//! served locally keeps working, a sync reports the failure instead of success, and once the
//! store heals everything works again and a fresh host can open what was synced.

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use blockd::objects::RemoteSetup;
use blockd::{Engine, EngineConfig};
use chunkstore::remote::{FaultConfig, FaultSettings, FaultyStore, OpRates, Remote};
use chunkstore::tier::TierConfig;
use object_store::memory::InMemory;
use std::sync::Arc;
use std::time::Duration;
use vhost_blk::BlockDevice;

const SIZE: u64 = 64 * 4096;

fn config(dir: &std::path::Path, store: Arc<dyn object_store::ObjectStore>) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    c.local.segment_bytes = 128 * 1024;
    c.remote = Some(RemoteSetup {
        remote: Remote::new(store, "bucket".into()),
        tier: TierConfig {
            cache_bytes: 0, // every clean frame is evicted by a background round
            gc_grace: Duration::ZERO,
            ..Default::default()
        },
        lease_check: Duration::from_secs(3600),
    });
    c
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..SIZE as usize)
        .map(|i| (i as u8).wrapping_mul(seed) ^ (i / 4096) as u8 | 1)
        .collect()
}

async fn write_all(e: &Engine, name: &str, data: &[u8]) {
    let vol = e.volume(name).unwrap();
    let mut buf = vol.alloc_buf(data.len());
    buf.as_mut().copy_from_slice(data);
    vol.write(0, buf, false).await.unwrap();
    vol.flush().await.unwrap();
}

async fn read_all(e: &Engine, name: &str) -> Result<Vec<u8>, vhost_blk::DeviceError> {
    let got = e.volume(name).unwrap().read(0, SIZE as usize).await?;
    Ok(got.as_ref().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_fails_only_what_needs_it_and_sync_never_lies() {
    let faults = FaultConfig::seeded(FaultSettings::default(), 7);
    let store: Arc<dyn object_store::ObjectStore> =
        Arc::new(FaultyStore::new(InMemory::new(), faults.clone()));
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(config(dir.path(), store.clone())).unwrap();

    // "cold": synced, then evicted from the local cache (reads need the store).
    e.create_volume_claimed("cold", SIZE).await.unwrap();
    let a = pattern(3);
    write_all(&e, "cold", &a).await;
    e.sync_volume("cold").await.unwrap();
    for _ in 0..3 {
        e.background_round().await.unwrap();
    }
    // "hot": written locally, never synced.
    e.create_volume_claimed("hot", SIZE).await.unwrap();
    let b = pattern(5);
    write_all(&e, "hot", &b).await;

    // Every request fails from now on, permanently.
    faults.set(FaultSettings {
        error_rate: OpRates::all(1.0),
        permanent_errors: true,
        ..Default::default()
    });
    let err = read_all(&e, "cold").await;
    assert!(
        matches!(err, Err(vhost_blk::DeviceError::Io(_))),
        "a read that needs the store fails with an I/O error: {err:?}"
    );
    assert_eq!(
        read_all(&e, "hot").await.unwrap(),
        b,
        "local data still reads"
    );
    let b2 = pattern(9);
    write_all(&e, "hot", &b2).await; // and takes writes
    let sync = e.sync_volume("hot").await;
    assert!(
        sync.is_err(),
        "a sync the store refused must fail: {sync:?}"
    );

    // The store heals: the failed read works, the sync completes, and a fresh host opens
    // exactly what was synced.
    faults.set(FaultSettings::default());
    assert_eq!(read_all(&e, "cold").await.unwrap(), a);
    e.sync_volume("hot").await.unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let other = Engine::open(config(dir2.path(), store.clone())).unwrap();
    other.import_volume("hot", None, true).await.unwrap();
    assert_eq!(read_all(&other, "hot").await.unwrap(), b2);
    other.import_volume("cold", None, true).await.unwrap();
    assert_eq!(read_all(&other, "cold").await.unwrap(), a);
}
