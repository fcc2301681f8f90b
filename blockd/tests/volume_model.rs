//! Model-based property test of `Volume` (real io_uring segments, real RocksDB): random
//! sequences of 512-byte-aligned writes (partial blocks included), discards, write-zeroes,
//! flushes, checkpoints, restores, clones, checkpoint and volume deletes, large reads that
//! relocate fragmented ranges in the background (blockd::defrag), background GC and
//! reclamation, and crash-reopen (the engine dropped without a flush), checked after every
//! step against a byte-exact in-memory model.
//!
//! An in-process "crash" loses nothing the OS already has, so after it every acknowledged
//! write must be there (the kill -9 tests in tests/ cover the process-death case with the
//! weaker flushed-only guarantee).

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use blockd::{Engine, EngineConfig};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use vhost_blk::BlockDevice;

const SIZE: u64 = 96 * 4096;
const NAMES: [&str; 2] = ["a", "b"];

#[derive(Debug, Clone)]
enum Op {
    Write {
        v: usize,
        off: u64,
        len: u64,
        seed: u8,
    },
    Zero {
        v: usize,
        off: u64,
        len: u64,
    },
    Discard {
        v: usize,
        off: u64,
        len: u64,
    },
    Flush,
    Checkpoint(usize),
    Restore(usize, usize),
    Clone(usize, usize),
    DeleteCheckpoint(usize, usize),
    DeleteVolume(usize),
    /// Overwrites every other block of a 40-block range, one request each: the range is
    /// fragmented on disk afterwards.
    Scatter {
        v: usize,
        block: u64,
        seed: u8,
    },
    /// A large read (fragmented ranges get relocated in the background while later
    /// operations run).
    ReadLarge {
        v: usize,
        block: u64,
        blocks: u64,
    },
    Background,
    Crash,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    // Mostly block-aligned, sometimes sector-aligned, up to 12 blocks; sometimes long
    // (16-40 blocks: the map is scanned for the old versions, reads coalesce).
    prop_oneof![
        4 => (0..SIZE / 4096, 1..12u64).prop_map(|(b, n)| (b * 4096, n * 4096)),
        1 => (0..SIZE / 4096, 16..40u64).prop_map(|(b, n)| (b * 4096, n * 4096)),
        2 => (0..SIZE / 512, 1..40u64).prop_map(|(s, n)| (s * 512, n * 512)),
    ]
    .prop_map(|(off, len)| (off, len.min(SIZE - off)))
}

fn op() -> impl Strategy<Value = Op> {
    let v = 0..NAMES.len();
    prop_oneof![
        8 => (v.clone(), range(), any::<u8>()).prop_map(|(v, (off, len), seed)| Op::Write { v, off, len, seed }),
        2 => (v.clone(), range()).prop_map(|(v, (off, len))| Op::Zero { v, off, len }),
        2 => (v.clone(), range()).prop_map(|(v, (off, len))| Op::Discard { v, off, len }),
        2 => Just(Op::Flush),
        2 => v.clone().prop_map(Op::Checkpoint),
        2 => (v.clone(), 0..6usize).prop_map(|(v, c)| Op::Restore(v, c)),
        1 => (v.clone(), 0..6usize).prop_map(|(v, c)| Op::Clone(v, c)),
        1 => (v.clone(), 0..6usize).prop_map(|(v, c)| Op::DeleteCheckpoint(v, c)),
        1 => v.clone().prop_map(Op::DeleteVolume),
        1 => (v.clone(), 0..SIZE / 4096 - 40, any::<u8>()).prop_map(|(v, block, seed)| Op::Scatter { v, block, seed }),
        3 => (v.clone(), 0..SIZE / 4096, 32..72u64).prop_map(|(v, block, blocks)| Op::ReadLarge { v, block, blocks }),
        2 => Just(Op::Background),
        1 => Just(Op::Crash),
    ]
}

#[derive(Clone)]
struct MVol {
    data: Vec<u8>,
    cps: BTreeMap<u64, Vec<u8>>,
    next_cp: u64,
}

impl MVol {
    fn new() -> MVol {
        MVol {
            data: vec![0; SIZE as usize],
            cps: BTreeMap::new(),
            next_cp: 1,
        }
    }
}

fn pattern(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (off..off + len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(seed | 1)
                .wrapping_add(seed)
                .rotate_left((i >> 9) as u32 % 8)
        })
        .collect()
}

struct Harness {
    dir: tempfile::TempDir,
    engine: Option<Arc<Engine>>,
    model: HashMap<String, MVol>,
}

fn config(dir: &std::path::Path) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    c.local.segment_bytes = 256 * 1024; // small segments: rollover, sealing and removal happen
    // Emptied segments are recycled (their files reused under new ids) and punches wait a
    // little, so reads after reuse and crash-reopen of a recycled file are checked too.
    c.local.recycle_segments = 2;
    c.local.punch_delay = std::time::Duration::from_millis(1);
    c.max_read_depth = 2;
    c
}

impl Harness {
    fn e(&self) -> &Arc<Engine> {
        self.engine.as_ref().unwrap()
    }

    fn pick(&self, name: &str, i: usize) -> Option<u64> {
        let cps = &self.model.get(name)?.cps;
        (!cps.is_empty()).then(|| *cps.keys().nth(i % cps.len()).unwrap())
    }

    async fn check(&self) {
        for (name, m) in &self.model {
            let vol = self.e().volume(name).unwrap();
            // Read in uneven pieces to exercise windows and run coalescing.
            let mut off = 0;
            let mut step = 4096 * 5 + 512;
            while off < SIZE {
                let len = step.min(SIZE - off);
                let got = vol.read(off, len as usize).await.unwrap();
                assert_eq!(
                    got.as_ref(),
                    &m.data[off as usize..(off + len) as usize],
                    "volume {name} bytes {off}+{len}"
                );
                off += len;
                step = if step > 40000 { 512 * 3 } else { step * 2 };
            }
            let st = self.e().stat(name).unwrap();
            // Blocks that hold anything but zeros are stored; zero blocks are not.
            let mapped = m
                .data
                .chunks(4096)
                .filter(|b| b.iter().any(|x| *x != 0))
                .count() as u64;
            assert_eq!(st.info.head_bytes, mapped * 4096, "{name} head bytes");
            assert_eq!(st.info.checkpoints, m.cps.len() as u64);
        }
    }

    async fn apply(&mut self, op: &Op) {
        match op.clone() {
            Op::Write { v, off, len, seed } => {
                let name = NAMES[v];
                if !self.model.contains_key(name) {
                    return;
                }
                let vol = self.e().volume(name).unwrap();
                let m = self.model.get_mut(name).unwrap();
                let data = pattern(seed, off, len);
                let mut buf = vol.alloc_buf(len as usize);
                buf.as_mut().copy_from_slice(&data);
                vol.write(off, buf, seed % 7 == 0).await.unwrap();
                m.data[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Zero { v, off, len } | Op::Discard { v, off, len } => {
                let name = NAMES[v];
                if !self.model.contains_key(name) {
                    return;
                }
                let vol = self.e().volume(name).unwrap();
                let m = self.model.get_mut(name).unwrap();
                if matches!(op, Op::Zero { .. }) {
                    vol.write_zeroes(off, len, false).await.unwrap();
                } else {
                    vol.discard(off, len).await.unwrap();
                }
                m.data[off as usize..(off + len) as usize].fill(0);
            }
            Op::Flush => self.e().flush().await.unwrap(),
            Op::Checkpoint(v) => {
                let name = NAMES[v];
                let r = self.e().create_checkpoint(name, "").await;
                let Some(m) = self.model.get_mut(name) else {
                    assert!(r.is_err());
                    return;
                };
                assert_eq!(r.unwrap().value.id.0, m.next_cp);
                m.cps.insert(m.next_cp, m.data.clone());
                m.next_cp += 1;
            }
            Op::Restore(v, c) => {
                let name = NAMES[v];
                let Some(id) = self.pick(name, c) else { return };
                let auto = self
                    .e()
                    .restore_checkpoint(name, snapshotter::CheckpointId(id), false)
                    .await
                    .unwrap();
                let m = self.model.get_mut(name).unwrap();
                assert_eq!(auto.value.id.0, m.next_cp);
                m.cps.insert(m.next_cp, m.data.clone());
                m.next_cp += 1;
                m.data = m.cps[&id].clone();
            }
            Op::Clone(v, c) => {
                let (name, other) = (NAMES[v], NAMES[1 - v]);
                let Some(id) = self.pick(name, c) else { return };
                let r = self
                    .e()
                    .clone_volume(name, snapshotter::CheckpointId(id), other)
                    .await;
                if self.model.contains_key(other) {
                    assert!(r.is_err());
                    return;
                }
                r.unwrap();
                let data = self.model[name].cps[&id].clone();
                self.model.insert(
                    other.to_string(),
                    MVol {
                        data,
                        ..MVol::new()
                    },
                );
            }
            Op::DeleteCheckpoint(v, c) => {
                let name = NAMES[v];
                let Some(id) = self.pick(name, c) else { return };
                self.e()
                    .delete_checkpoint(name, snapshotter::CheckpointId(id))
                    .await
                    .unwrap();
                self.model.get_mut(name).unwrap().cps.remove(&id);
            }
            Op::DeleteVolume(v) => {
                let name = NAMES[v];
                let r = self.e().delete_volume(name, false).await;
                assert_eq!(r.is_ok(), self.model.remove(name).is_some());
                // Keep at least one volume around.
                if self.model.is_empty() {
                    self.e().create_volume(name, SIZE).unwrap();
                    self.model.insert(name.to_string(), MVol::new());
                }
            }
            Op::Background => {
                for _ in 0..3 {
                    self.e().background_round().await.unwrap();
                    self.e().flush().await.unwrap();
                }
                self.e().background_round().await.unwrap();
            }
            Op::Scatter { v, block, seed } => {
                let name = NAMES[v];
                if !self.model.contains_key(name) {
                    return;
                }
                let vol = self.e().volume(name).unwrap();
                for b in (block..block + 40).step_by(2) {
                    let data = pattern(seed, b * 4096, 4096);
                    let mut buf = vol.alloc_buf(4096);
                    buf.as_mut().copy_from_slice(&data);
                    vol.write(b * 4096, buf, false).await.unwrap();
                    let m = self.model.get_mut(name).unwrap();
                    m.data[(b * 4096) as usize..((b + 1) * 4096) as usize].copy_from_slice(&data);
                }
            }
            Op::ReadLarge { v, block, blocks } => {
                let name = NAMES[v];
                let Some(m) = self.model.get(name) else {
                    return;
                };
                let off = block * 4096;
                let len = (blocks * 4096).min(SIZE - off);
                let got = self
                    .e()
                    .volume(name)
                    .unwrap()
                    .read(off, len as usize)
                    .await
                    .unwrap();
                assert_eq!(got.as_ref(), &m.data[off as usize..(off + len) as usize]);
            }
            Op::Crash => {
                // A relocation task holds the engine open: let it finish (a real crash
                // loses it, which the kill -9 tests cover).
                self.e().core.defrag.idle().await;
                self.engine = None; // no flush, no shutdown
                self.engine = Some(Engine::open(config(self.dir.path())).unwrap());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn volume_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let engine = Engine::open(config(dir.path())).unwrap();
            let mut h = Harness { dir, engine: Some(engine), model: HashMap::new() };
            h.e().create_volume("a", SIZE).unwrap();
            h.model.insert("a".into(), MVol::new());
            for op in &ops {
                h.apply(op).await;
                h.check().await;
            }
            // Delete everything: all space must come back.
            h.e().core.defrag.idle().await;
            for name in NAMES {
                if h.model.remove(name).is_some() {
                    h.e().delete_volume(name, false).await.unwrap();
                }
            }
            for _ in 0..4 {
                h.e().background_round().await.unwrap();
                h.e().flush().await.unwrap();
            }
            h.e().background_round().await.unwrap();
            assert!(h.e().snapshotter().group_refs().is_empty());
            let segs = h.e().core.local.segment_ids().len();
            assert!(segs <= 1, "{segs} segments left after deleting everything");
        });
    }
}
