//! Model-based property test of volumes over the object-store tier, with a store that
//! injects transient errors, latency, lost acknowledgements and corrupted reads, and a
//! cache budget of zero (every clean frame is evicted whenever eviction runs, so reads go
//! to the store constantly). Operations interleave writes, checkpoints, restores, clones,
//! checkpoint and volume deletes, syncs, uploads, eviction, object GC with no grace
//! period, crash-reopen, and cold opens of a synced volume on a second engine.
//!
//! Checked after every step: every volume reads back exactly as the model says (so GC
//! never deleted an object something still needs, and corruption never reached a reader).

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use blockd::objects::RemoteSetup;
use blockd::{Engine, EngineConfig};
use chunkstore::remote::{FaultConfig, FaultSettings, FaultyStore, OpRates, Remote};
use chunkstore::tier::TierConfig;
use object_store::memory::InMemory;
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use vhost_blk::BlockDevice;

const SIZE: u64 = 48 * 4096;
const NAMES: [&str; 2] = ["a", "b"];

#[derive(Debug, Clone)]
enum Op {
    Write {
        v: usize,
        block: u64,
        n: u64,
        seed: u8,
    },
    Discard {
        v: usize,
        block: u64,
        n: u64,
    },
    Checkpoint(usize),
    Restore(usize, usize),
    Clone(usize, usize),
    DeleteCheckpoint(usize, usize),
    DeleteVolume(usize),
    Sync(usize),
    Background,
    Crash,
    ColdOpen(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let v = 0..NAMES.len();
    prop_oneof![
        8 => (v.clone(), 0..48u64, 1..20u64, any::<u8>()).prop_map(|(v, block, n, seed)| Op::Write { v, block, n, seed }),
        2 => (v.clone(), 0..48u64, 1..20u64).prop_map(|(v, block, n)| Op::Discard { v, block, n }),
        2 => v.clone().prop_map(Op::Checkpoint),
        1 => (v.clone(), 0..5usize).prop_map(|(v, c)| Op::Restore(v, c)),
        1 => (v.clone(), 0..5usize).prop_map(|(v, c)| Op::Clone(v, c)),
        2 => (v.clone(), 0..5usize).prop_map(|(v, c)| Op::DeleteCheckpoint(v, c)),
        1 => v.clone().prop_map(Op::DeleteVolume),
        3 => v.clone().prop_map(Op::Sync),
        3 => Just(Op::Background),
        1 => Just(Op::Crash),
        1 => v.clone().prop_map(Op::ColdOpen),
    ]
}

#[derive(Clone, Default)]
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

fn pattern(seed: u8, block: u64, n: u64) -> Vec<u8> {
    (0..n * 4096)
        .map(|i| {
            ((i + block * 4096) as u8).wrapping_mul(seed | 1)
                ^ seed.rotate_left((i / 4096) as u32 % 8)
                | 1
        })
        .collect()
}

fn setup(store: Arc<dyn object_store::ObjectStore>) -> RemoteSetup {
    RemoteSetup {
        remote: Remote::new(store, "bucket".into()),
        tier: TierConfig {
            cache_bytes: 0,
            dirty_limit: 64 << 20,
            gc_grace: Duration::ZERO,
            readahead_frames: 2,
            ..Default::default()
        },
        lease_check: Duration::from_secs(3600),
    }
}

fn config(dir: &std::path::Path, store: Arc<dyn object_store::ObjectStore>) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    c.local.segment_bytes = 128 * 1024; // segments seal (and upload) often
    c.max_read_depth = 2;
    c.remote = Some(setup(store));
    c
}

struct Harness {
    dir: tempfile::TempDir,
    store: Arc<dyn object_store::ObjectStore>,
    engine: Option<Arc<Engine>>,
    model: HashMap<String, MVol>,
}

impl Harness {
    fn e(&self) -> &Arc<Engine> {
        self.engine.as_ref().unwrap()
    }

    fn pick(&self, name: &str, i: usize) -> Option<u64> {
        let cps = &self.model.get(name)?.cps;
        (!cps.is_empty()).then(|| *cps.keys().nth(i % cps.len()).unwrap())
    }

    async fn check_engine(e: &Arc<Engine>, name: &str, m: &MVol) {
        let vol = e.volume(name).unwrap();
        let got = vol.read(0, SIZE as usize).await.unwrap();
        assert!(
            got.as_ref() == &m.data[..],
            "volume {name} differs from the model"
        );
    }

    async fn check(&self) {
        for (name, m) in &self.model {
            Self::check_engine(self.e(), name, m).await;
        }
    }

    async fn apply(&mut self, op: &Op) {
        match op.clone() {
            Op::Write { v, block, n, seed } => {
                let name = NAMES[v];
                if !self.model.contains_key(name) {
                    return;
                }
                let n = n.min(48 - block);
                let vol = self.e().volume(name).unwrap();
                let data = pattern(seed, block, n);
                let mut buf = vol.alloc_buf(data.len());
                buf.as_mut().copy_from_slice(&data);
                vol.write(block * 4096, buf, false).await.unwrap();
                let m = self.model.get_mut(name).unwrap();
                m.data[(block * 4096) as usize..((block + n) * 4096) as usize]
                    .copy_from_slice(&data);
            }
            Op::Discard { v, block, n } => {
                let name = NAMES[v];
                if !self.model.contains_key(name) {
                    return;
                }
                let n = n.min(48 - block);
                self.e()
                    .volume(name)
                    .unwrap()
                    .discard(block * 4096, n * 4096)
                    .await
                    .unwrap();
                let m = self.model.get_mut(name).unwrap();
                m.data[(block * 4096) as usize..((block + n) * 4096) as usize].fill(0);
            }
            Op::Checkpoint(v) => {
                let name = NAMES[v];
                let Some(_) = self.model.get(name) else {
                    return;
                };
                let cp = self.e().create_checkpoint(name, "").await.unwrap();
                let m = self.model.get_mut(name).unwrap();
                assert_eq!(cp.value.id.0, m.next_cp);
                m.cps.insert(m.next_cp, m.data.clone());
                m.next_cp += 1;
            }
            Op::Restore(v, c) => {
                let name = NAMES[v];
                let Some(id) = self.pick(name, c) else { return };
                self.e()
                    .restore_checkpoint(name, snapshotter::CheckpointId(id), false)
                    .await
                    .unwrap();
                let m = self.model.get_mut(name).unwrap();
                m.cps.insert(m.next_cp, m.data.clone());
                m.next_cp += 1;
                m.data = m.cps[&id].clone();
            }
            Op::Clone(v, c) => {
                let (name, other) = (NAMES[v], NAMES[1 - v]);
                let Some(id) = self.pick(name, c) else { return };
                if self.model.contains_key(other) {
                    return;
                }
                self.e()
                    .clone_volume(name, snapshotter::CheckpointId(id), other)
                    .await
                    .unwrap();
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
                if self.model.remove(name).is_none() {
                    return;
                }
                self.e().delete_volume(name, false).await.unwrap();
                if self.model.is_empty() {
                    self.e().create_volume_claimed(name, SIZE).await.unwrap();
                    self.model.insert(name.to_string(), MVol::new());
                }
            }
            Op::Sync(v) => {
                let name = NAMES[v];
                if !self.model.contains_key(name) {
                    return;
                }
                self.e().sync_volume(name).await.unwrap();
            }
            Op::Background => {
                for _ in 0..3 {
                    self.e().background_round().await.unwrap();
                    self.e().flush().await.unwrap();
                }
                self.e().background_round().await.unwrap();
            }
            Op::Crash => {
                // A background relocation holds the engine; a real crash would end it.
                self.e().core.defrag.idle().await;
                self.engine = None;
                let e = Engine::open(config(self.dir.path(), self.store.clone())).unwrap();
                e.reclaim_leases().await;
                self.engine = Some(e);
            }
            Op::ColdOpen(v) => {
                let name = NAMES[v];
                let Some(m) = self.model.get(name).cloned() else {
                    return;
                };
                self.e().sync_volume(name).await.unwrap();
                // A second host: empty data dir, same bucket; takes the volume over.
                let dir = tempfile::tempdir().unwrap();
                let other = Engine::open(config(dir.path(), self.store.clone())).unwrap();
                other.import_volume(name, None, true).await.unwrap();
                Self::check_engine(&other, name, &m).await;
                for (id, data) in &m.cps {
                    let fork = format!("{name}-v{id}");
                    other
                        .clone_volume(name, snapshotter::CheckpointId(*id), &fork)
                        .await
                        .unwrap();
                    let got = other
                        .volume(&fork)
                        .unwrap()
                        .read(0, SIZE as usize)
                        .await
                        .unwrap();
                    assert!(
                        got.as_ref() == &data[..],
                        "checkpoint v{id} of {name} differs after a cold open"
                    );
                }
                other.core.defrag.idle().await;
                drop(other);
                // Take the volume back, as the operator would after the other host left.
                self.e().claim_volume(name, true).await.unwrap();
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn tiered_volumes_match_model_under_faults(ops in prop::collection::vec(op(), 1..40), seed: u64) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let faults = FaultConfig::seeded(
                FaultSettings {
                    error_rate: OpRates::all(0.05),
                    latency: Duration::from_micros(200),
                    jitter: Duration::from_micros(300),
                    corrupt_rate: 0.05,
                    corrupt_bits: 3,
                    lost_ack_rate: 0.05,
                    ..Default::default()
                },
                seed,
            );
            let store: Arc<dyn object_store::ObjectStore> =
                Arc::new(FaultyStore::new(InMemory::new(), faults.clone()));
            let dir = tempfile::tempdir().unwrap();
            let engine = Engine::open(config(dir.path(), store.clone())).unwrap();
            let mut h = Harness { dir, store, engine: Some(engine), model: HashMap::new() };
            h.e().create_volume_claimed("a", SIZE).await.unwrap();
            h.model.insert("a".into(), MVol::new());
            for op in &ops {
                h.apply(op).await;
                h.check().await;
            }
            let _ = faults.stats();
        });
    }
}
