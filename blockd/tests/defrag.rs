//! Defragmentation on read (blockd::defrag) with real segments and RocksDB: a range
//! scattered by overwrites is rewritten in block order by the first large read of it; the
//! data never changes; checkpointed blocks stay put; the moves survive a reopen.

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use blockd::{Engine, EngineConfig};
use snapshotter::Mapping;
use std::sync::Arc;
use vhost_blk::BlockDevice;

const BLOCKS: u64 = 64;
const BS: u64 = 4096;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

async fn write(vol: &blockd::Volume, off: u64, data: &[u8]) {
    let mut buf = vol.alloc_buf(data.len());
    buf.as_mut().copy_from_slice(data);
    vol.write(off, buf, false).await.unwrap();
}

/// Contiguous disk runs the head's map has for the volume's first `BLOCKS` blocks.
fn runs(e: &Engine, name: &str) -> usize {
    let maps = e
        .snapshotter()
        .volume(name)
        .unwrap()
        .lookup(0, BLOCKS as usize)
        .unwrap();
    let mut runs = 0;
    let mut prev: Option<(u64, u32)> = None;
    for m in maps {
        let Mapping::Data { phys, .. } = m else {
            prev = None;
            continue;
        };
        if prev != Some((phys.group, phys.index.wrapping_sub(1))) {
            runs += 1;
        }
        prev = Some((phys.group, phys.index));
    }
    runs
}

/// Writes the range, then overwrites every other block one request at a time: the range's
/// blocks alternate between two places on disk. Returns the expected contents.
async fn scatter(vol: &blockd::Volume) -> Vec<u8> {
    let mut expect = pattern(1, (BLOCKS * BS) as usize);
    write(vol, 0, &expect).await;
    for b in (0..BLOCKS).step_by(2) {
        let d = pattern(b as u8 + 7, BS as usize);
        write(vol, b * BS, &d).await;
        expect[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&d);
    }
    expect
}

fn config(dir: &std::path::Path) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    c.local.segment_bytes = 1 << 20;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_range_is_rewritten_in_order_by_a_large_read() {
    let dir = tempfile::tempdir().unwrap();
    let e: Arc<Engine> = Engine::open(config(dir.path())).unwrap();
    e.create_volume("v", BLOCKS * BS).unwrap();
    let vol = e.volume("v").unwrap();
    let expect = scatter(&vol).await;
    assert!(
        runs(&e, "v") >= BLOCKS as usize / 2,
        "the range is scattered"
    );
    let before = e.stat("v").unwrap();

    // Small reads never relocate.
    for b in 0..BLOCKS {
        vol.read(b * BS, BS as usize).await.unwrap();
    }
    e.core.defrag.idle().await;
    assert_eq!(e.core.defrag.totals(), (0, 0));

    // One large read: same bytes, and the range is moved into one run behind it.
    let got = vol.read(0, (BLOCKS * BS) as usize).await.unwrap();
    assert_eq!(got.as_ref(), &expect[..]);
    e.core.defrag.idle().await;
    assert_eq!(e.core.defrag.totals(), (BLOCKS * BS, 0));
    assert_eq!(runs(&e, "v"), 1);
    let got = vol.read(0, (BLOCKS * BS) as usize).await.unwrap();
    assert_eq!(got.as_ref(), &expect[..]);
    // Nothing to bill differently: the same bytes, held once.
    let after = e.stat("v").unwrap();
    assert_eq!(after.info.head_bytes, before.info.head_bytes);
    assert_eq!(after.info.owned_bytes, before.info.owned_bytes);
    // A contiguous range is left alone.
    vol.read(0, (BLOCKS * BS) as usize).await.unwrap();
    e.core.defrag.idle().await;
    assert_eq!(e.core.defrag.totals(), (BLOCKS * BS, 0));

    // The old copies are reclaimed like overwritten blocks: after a flush and a round
    // of background work, only the moved copies hold space.
    for _ in 0..3 {
        e.flush().await.unwrap();
        e.background_round().await.unwrap();
    }
    e.core.reclaim_ready().await;

    // Durable across a reopen.
    drop(vol);
    e.shutdown().await.unwrap();
    drop(e);
    let e = Engine::open(config(dir.path())).unwrap();
    let vol = e.volume("v").unwrap();
    let got = vol.read(0, (BLOCKS * BS) as usize).await.unwrap();
    assert_eq!(got.as_ref(), &expect[..]);
    assert_eq!(runs(&e, "v"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpointed_blocks_stay_and_move_once_released() {
    let dir = tempfile::tempdir().unwrap();
    let e: Arc<Engine> = Engine::open(config(dir.path())).unwrap();
    e.create_volume("v", BLOCKS * BS).unwrap();
    let vol = e.volume("v").unwrap();
    let expect = scatter(&vol).await;
    let cp = e.create_checkpoint("v", "").await.unwrap().value;
    let scattered = runs(&e, "v");

    let got = vol.read(0, (BLOCKS * BS) as usize).await.unwrap();
    assert_eq!(got.as_ref(), &expect[..]);
    e.core.defrag.idle().await;
    // Copied, then freed again: the checkpoint sees every block.
    assert_eq!(e.core.defrag.totals(), (0, BLOCKS * BS));
    assert_eq!(runs(&e, "v"), scattered);

    // Once the checkpoint is gone, the next large read moves them.
    e.delete_checkpoint("v", cp.id).await.unwrap();
    e.background_round().await.unwrap();
    let got = vol.read(0, (BLOCKS * BS) as usize).await.unwrap();
    assert_eq!(got.as_ref(), &expect[..]);
    e.core.defrag.idle().await;
    assert_eq!(e.core.defrag.totals(), (BLOCKS * BS, BLOCKS * BS));
    assert_eq!(runs(&e, "v"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switched_off_never_moves() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.defrag_on_read = false;
    let e: Arc<Engine> = Engine::open(c).unwrap();
    e.create_volume("v", BLOCKS * BS).unwrap();
    let vol = e.volume("v").unwrap();
    let expect = scatter(&vol).await;
    let scattered = runs(&e, "v");
    let got = vol.read(0, (BLOCKS * BS) as usize).await.unwrap();
    assert_eq!(got.as_ref(), &expect[..]);
    e.core.defrag.idle().await;
    assert_eq!(e.core.defrag.totals(), (0, 0));
    assert_eq!(runs(&e, "v"), scattered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_racing_relocations_win() {
    // Large reads and overwrites of the same range at once: whatever the interleaving,
    // the last write of each block is what reads back.
    let dir = tempfile::tempdir().unwrap();
    let e: Arc<Engine> = Engine::open(config(dir.path())).unwrap();
    e.create_volume("v", BLOCKS * BS).unwrap();
    let vol = e.volume("v").unwrap();
    let mut expect = scatter(&vol).await;
    for round in 0..20u8 {
        let reader = {
            let vol = vol.clone();
            tokio::spawn(async move { vol.read(0, (BLOCKS * BS) as usize).await.unwrap() })
        };
        for b in (round as u64 % 3..BLOCKS).step_by(3) {
            let d = pattern(round.wrapping_mul(13).wrapping_add(b as u8), BS as usize);
            write(&vol, b * BS, &d).await;
            expect[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&d);
        }
        reader.await.unwrap();
        e.core.defrag.idle().await;
        let got = vol.read(0, (BLOCKS * BS) as usize).await.unwrap();
        assert_eq!(got.as_ref(), &expect[..], "round {round}");
    }
    e.core.defrag.idle().await;
    let (moved, _) = e.core.defrag.totals();
    assert!(moved > 0, "some relocations went through");
    e.flush().await.unwrap();
    drop(vol);
    e.shutdown().await.unwrap();
    drop(e);
    let e = Engine::open(config(dir.path())).unwrap();
    let got = e
        .volume("v")
        .unwrap()
        .read(0, (BLOCKS * BS) as usize)
        .await
        .unwrap();
    assert_eq!(got.as_ref(), &expect[..]);
}
