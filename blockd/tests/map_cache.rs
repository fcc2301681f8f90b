//! The head's block-mapping cache (`storage.map_cache`, snapshotter/src/headcache.rs) with
//! real segments and RocksDB: reads that hit it return what was last acknowledged, also
//! while writes to the same blocks race them; a restore shows the checkpoint, not cached
//! blocks of the replaced head; a zero budget turns it off; its memory is reported.

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use blockd::{Engine, EngineConfig};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use vhost_blk::BlockDevice;

const BS: u64 = 4096;
const BLOCKS: u64 = 64;

/// A block whose first 8 bytes are `stamp` and the rest derived from it.
fn block(stamp: u64) -> Vec<u8> {
    let mut b: Vec<u8> = (0..BS as usize)
        .map(|i| (i as u8).wrapping_mul(13) ^ stamp as u8)
        .collect();
    b[..8].copy_from_slice(&stamp.to_le_bytes());
    b
}

fn stamp_of(b: &[u8]) -> u64 {
    let s = u64::from_le_bytes(b[..8].try_into().unwrap());
    assert_eq!(b, &block(s)[..], "block with stamp {s} is torn or foreign");
    s
}

async fn write(vol: &blockd::Volume, lba: u64, stamp: u64) {
    let data = block(stamp);
    let mut buf = vol.alloc_buf(data.len());
    buf.as_mut().copy_from_slice(&data);
    vol.write(lba * BS, buf, false).await.unwrap();
}

async fn read(vol: &blockd::Volume, lba: u64) -> u64 {
    let got = vol.read(lba * BS, BS as usize).await.unwrap();
    stamp_of(got.as_ref())
}

fn engine(dir: &std::path::Path, map_cache: usize) -> Arc<Engine> {
    let mut c = EngineConfig::new(dir);
    c.local.segment_bytes = 1 << 20;
    c.head_cache_bytes = map_cache;
    let e = Engine::open(c).unwrap();
    e.create_volume("v", BLOCKS * BS).unwrap();
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_reads_follow_writes_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), 16 << 20);
    let vol = e.volume("v").unwrap();
    assert_eq!(e.stat("v").unwrap().info.map_cache_bytes, 0);
    for lba in 0..BLOCKS {
        write(&vol, lba, lba + 1).await;
    }
    // Twice: the first read fills, the second hits.
    for _ in 0..2 {
        for lba in 0..BLOCKS {
            assert_eq!(read(&vol, lba).await, lba + 1);
        }
    }
    assert!(e.stat("v").unwrap().info.map_cache_bytes > 0);

    // Overwrite, discard and zero cached blocks: the next reads see each change.
    write(&vol, 3, 1000).await;
    assert_eq!(read(&vol, 3).await, 1000);
    vol.discard(4 * BS, BS).await.unwrap();
    let zeros = vol.read(4 * BS, BS as usize).await.unwrap();
    assert!(zeros.as_ref().iter().all(|&b| b == 0));
    write(&vol, 4, 1001).await;
    assert_eq!(read(&vol, 4).await, 1001);

    // Checkpoint, overwrite (and cache the new values), restore: the checkpoint shows.
    let cp = e.create_checkpoint("v", "").await.unwrap().value;
    for lba in 0..8 {
        write(&vol, lba, 2000 + lba).await;
        assert_eq!(read(&vol, lba).await, 2000 + lba);
    }
    let auto = e.restore_checkpoint("v", cp.id, false).await.unwrap().value;
    let vol = e.volume("v").unwrap();
    let expect = |lba: u64| match lba {
        3 => 1000,
        4 => 1001,
        l => l + 1,
    };
    for _ in 0..2 {
        for lba in 0..BLOCKS {
            assert_eq!(read(&vol, lba).await, expect(lba), "block {lba}");
        }
    }
    // And back (restore is undoable): the overwritten values again.
    e.restore_checkpoint("v", auto.id, false).await.unwrap();
    let vol = e.volume("v").unwrap();
    for lba in 0..8 {
        assert_eq!(read(&vol, lba).await, 2000 + lba);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_budget_caches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), 0);
    let vol = e.volume("v").unwrap();
    for lba in 0..BLOCKS {
        write(&vol, lba, lba + 7).await;
    }
    for lba in 0..BLOCKS {
        assert_eq!(read(&vol, lba).await, lba + 7);
    }
    write(&vol, 9, 99).await;
    assert_eq!(read(&vol, 9).await, 99);
    assert_eq!(e.stat("v").unwrap().info.map_cache_bytes, 0);
}

/// Readers hammer a few blocks while a writer overwrites them with rising stamps: a read
/// that starts after a write was acknowledged must return that write or a later one (a
/// stale mapping cached by a lookup that raced the write would return an older stamp).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_racing_writes_never_go_back_in_time() {
    const HOT: u64 = 4;
    const ROUNDS: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), 16 << 20);
    let vol = e.volume("v").unwrap();
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..HOT).map(|_| AtomicU64::new(0)).collect());
    for lba in 0..HOT {
        write(&vol, lba, 0).await;
    }
    let mut readers = Vec::new();
    for r in 0..3u64 {
        let (vol, acked) = (vol.clone(), acked.clone());
        readers.push(tokio::spawn(async move {
            let mut reads = 0u64;
            let mut lba = r;
            loop {
                lba = (lba + 1) % HOT;
                let floor = acked[lba as usize].load(Ordering::Acquire);
                let got = read(&vol, lba).await;
                assert!(
                    got >= floor,
                    "block {lba}: read stamp {got} after stamp {floor} was acknowledged"
                );
                reads += 1;
                if floor == ROUNDS {
                    return reads;
                }
            }
        }));
    }
    for stamp in 1..=ROUNDS {
        for lba in 0..HOT {
            write(&vol, lba, stamp).await;
            acked[lba as usize].store(stamp, Ordering::Release);
        }
    }
    for r in readers {
        assert!(r.await.unwrap() > 0);
    }
    for lba in 0..HOT {
        assert_eq!(read(&vol, lba).await, ROUNDS);
    }
}
