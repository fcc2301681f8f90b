//! Model-based property test of the metadata engine: random sequences of writes, zeroes,
//! checkpoints, restores, clones, deletions, GC, flattening and reopen, checked against a
//! trivially correct in-memory model after every step. Physical addresses are fake and
//! unique per written block, which makes two safety properties checkable:
//! - no block any volume head or checkpoint still shows is ever released, and
//! - once every volume is deleted and GC ran, every block written was released exactly once.

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use proptest::prelude::*;
use snapshotter::{
    BLOCK_SIZE, BlockUpdate, CheckpointId, Mapping, Options, PhysBlock, Released, Snapshotter,
};
use std::collections::{BTreeMap, HashMap, HashSet};

const BLOCKS: u64 = 24;
const NAMES: [&str; 3] = ["v0", "v1", "v2"];

#[derive(Debug, Clone)]
enum Op {
    Create(usize),
    Write(usize, u64, u64),
    Zero(usize, u64, u64),
    /// Several writes/zeroes of one volume committed as one group (may overlap).
    Group(usize, Vec<(u64, u64, bool)>),
    Checkpoint(usize),
    Restore(usize, usize),
    Clone(usize, usize, usize),
    DeleteCheckpoint(usize, usize),
    DeleteVolume(usize),
    Gc,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let v = 0..NAMES.len();
    prop_oneof![
        1 => v.clone().prop_map(Op::Create),
        6 => (v.clone(), 0..BLOCKS, 1..6u64).prop_map(|(v, l, n)| Op::Write(v, l, n)),
        2 => (v.clone(), 0..BLOCKS, 1..6u64).prop_map(|(v, l, n)| Op::Zero(v, l, n)),
        // Long ranges: the commit finds the old versions with a scan, not point lookups.
        2 => (v.clone(), 0..8u64, 16..25u64).prop_map(|(v, l, n)| Op::Write(v, l, n)),
        1 => (v.clone(), 0..8u64, 16..25u64).prop_map(|(v, l, n)| Op::Zero(v, l, n)),
        3 => (v.clone(), prop::collection::vec((0..BLOCKS, 1..6u64, prop::bool::weighted(0.3)), 1..6))
            .prop_map(|(v, items)| Op::Group(v, items)),
        3 => v.clone().prop_map(Op::Checkpoint),
        2 => (v.clone(), 0..8usize).prop_map(|(v, c)| Op::Restore(v, c)),
        1 => (v.clone(), 0..8usize, v.clone()).prop_map(|(v, c, d)| Op::Clone(v, c, d)),
        2 => (v.clone(), 0..8usize).prop_map(|(v, c)| Op::DeleteCheckpoint(v, c)),
        1 => v.clone().prop_map(Op::DeleteVolume),
        2 => Just(Op::Gc),
        1 => Just(Op::Reopen),
    ]
}

type View = Vec<Option<u64>>;

#[derive(Default, Clone)]
struct MVol {
    head: View,
    cps: BTreeMap<u64, View>,
    next_cp: u64,
}

struct Harness {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    snap: Option<Snapshotter>,
    model: HashMap<String, MVol>,
    next_token: u64,
    written: HashSet<u64>,
    released: HashSet<u64>,
}

fn phys(token: u64) -> PhysBlock {
    PhysBlock {
        group: token / 5,
        index: (token % 5) as u32,
    }
}

fn token(p: PhysBlock) -> u64 {
    p.group * 5 + p.index as u64
}

impl Harness {
    fn s(&self) -> &Snapshotter {
        self.snap.as_ref().unwrap()
    }

    fn take(&mut self, r: Released) {
        for b in r.blocks {
            let t = token(b);
            assert!(self.written.contains(&t), "released unknown block {t}");
            assert!(self.released.insert(t), "block {t} released twice");
        }
    }

    fn views(&self) -> Vec<(String, Option<u64>, View)> {
        let mut out = Vec::new();
        for (name, v) in &self.model {
            out.push((name.clone(), None, v.head.clone()));
            for (id, view) in &v.cps {
                out.push((name.clone(), Some(*id), view.clone()));
            }
        }
        out
    }

    fn check(&self) {
        for (name, cp, view) in self.views() {
            let got: Vec<Mapping> = match cp {
                None => self
                    .s()
                    .volume(&name)
                    .unwrap()
                    .lookup(0, BLOCKS as usize)
                    .unwrap(),
                Some(id) => self
                    .s()
                    .checkpoint_reader(&name, CheckpointId(id))
                    .unwrap()
                    .lookup(0, BLOCKS as usize)
                    .unwrap(),
            };
            let got: View = got
                .into_iter()
                .map(|m| match m {
                    Mapping::Zero => None,
                    Mapping::Data { phys: p, crc } => {
                        assert_eq!(token(p), crc as u64);
                        Some(token(p))
                    }
                })
                .collect();
            assert_eq!(got, view, "{name} at {cp:?}");
            // Block by block too: single-block reads take the point-lookup path.
            for (b, want) in view.iter().enumerate() {
                let one = match cp {
                    None => self.s().volume(&name).unwrap().lookup(b as u64, 1).unwrap(),
                    Some(id) => self
                        .s()
                        .checkpoint_reader(&name, CheckpointId(id))
                        .unwrap()
                        .lookup(b as u64, 1)
                        .unwrap(),
                };
                let one = match one[0] {
                    Mapping::Zero => None,
                    Mapping::Data { phys: p, .. } => Some(token(p)),
                };
                assert_eq!(one, *want, "{name} at {cp:?}, block {b} read alone");
            }
            for t in view.iter().flatten() {
                assert!(
                    !self.released.contains(t),
                    "{name}@{cp:?} still shows released block {t}"
                );
            }
            if cp.is_none() {
                let st = self.s().stat(&name).unwrap();
                let data = view.iter().filter(|t| t.is_some()).count() as u64;
                assert_eq!(st.head_bytes, data * BLOCK_SIZE, "{name} head bytes");
                assert_eq!(st.checkpoints as usize, self.model[&name].cps.len());
            }
        }
        let mut names: Vec<String> = self.model.keys().cloned().collect();
        names.sort();
        let listed: Vec<String> = self
            .s()
            .list_volumes()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(listed, names);
    }

    fn cp_pick(&self, name: &str, i: usize) -> Option<u64> {
        let cps = &self.model.get(name)?.cps;
        if cps.is_empty() {
            return None;
        }
        cps.keys().nth(i % cps.len()).copied()
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Create(v) => {
                let name = NAMES[v];
                let r = self.s().create_volume(name, BLOCKS * BLOCK_SIZE);
                if self.model.contains_key(name) {
                    assert!(r.is_err());
                } else {
                    r.unwrap();
                    self.model.insert(
                        name.to_string(),
                        MVol {
                            head: vec![None; BLOCKS as usize],
                            next_cp: 1,
                            ..Default::default()
                        },
                    );
                }
            }
            Op::Write(v, lba, n) | Op::Zero(v, lba, n) => {
                let name = NAMES[v];
                if !self.model.contains_key(name) {
                    assert!(self.s().volume(name).is_err());
                    return;
                }
                let n = n.min(BLOCKS - lba) as usize;
                let h = self.s().volume(name).unwrap();
                let commit = if matches!(op, Op::Write(..)) {
                    let toks: Vec<u64> = (0..n)
                        .map(|_| {
                            self.next_token += 1;
                            self.next_token
                        })
                        .collect();
                    self.written.extend(&toks);
                    let blocks: Vec<(PhysBlock, u32)> =
                        toks.iter().map(|t| (phys(*t), *t as u32)).collect();
                    let c = h.commit_write(lba, &blocks).unwrap();
                    let m = self.model.get_mut(name).unwrap();
                    for (i, t) in toks.into_iter().enumerate() {
                        m.head[lba as usize + i] = Some(t);
                    }
                    c
                } else {
                    let c = h.commit_zero(lba, n).unwrap();
                    let m = self.model.get_mut(name).unwrap();
                    for i in 0..n {
                        m.head[lba as usize + i] = None;
                    }
                    c
                };
                self.take(commit.released);
            }
            Op::Group(v, ref items) => {
                let name = NAMES[v];
                if !self.model.contains_key(name) {
                    return;
                }
                let h = self.s().volume(name).unwrap();
                let mut reqs: Vec<(u64, Vec<BlockUpdate>)> = Vec::new();
                for &(lba, n, zero) in items {
                    let n = n.min(BLOCKS - lba) as usize;
                    let updates: Vec<BlockUpdate> = (0..n)
                        .map(|_| {
                            if zero {
                                return BlockUpdate::Zero;
                            }
                            self.next_token += 1;
                            self.written.insert(self.next_token);
                            BlockUpdate::Data(phys(self.next_token), self.next_token as u32)
                        })
                        .collect();
                    reqs.push((lba, updates));
                }
                let refs: Vec<(u64, &[BlockUpdate])> =
                    reqs.iter().map(|(l, u)| (*l, u.as_slice())).collect();
                let commits = h.commit_group(&refs).unwrap();
                assert_eq!(commits.len(), reqs.len());
                for c in commits {
                    self.take(c.released);
                }
                let m = self.model.get_mut(name).unwrap();
                for (lba, updates) in &reqs {
                    for (i, u) in updates.iter().enumerate() {
                        m.head[*lba as usize + i] = match u {
                            BlockUpdate::Zero => None,
                            BlockUpdate::Data(p, _) => Some(token(*p)),
                        };
                    }
                }
            }
            Op::Checkpoint(v) => {
                let name = NAMES[v];
                let r = self.s().create_checkpoint(name, "p");
                match self.model.get_mut(name) {
                    None => assert!(r.is_err()),
                    Some(m) => {
                        assert_eq!(r.unwrap().id, CheckpointId(m.next_cp));
                        m.cps.insert(m.next_cp, m.head.clone());
                        m.next_cp += 1;
                    }
                }
            }
            Op::Restore(v, c) => {
                let name = NAMES[v];
                let Some(id) = self.cp_pick(name, c) else {
                    return;
                };
                let auto = self.s().restore(name, CheckpointId(id)).unwrap();
                let m = self.model.get_mut(name).unwrap();
                assert_eq!(auto.id, CheckpointId(m.next_cp));
                m.cps.insert(m.next_cp, m.head.clone());
                m.next_cp += 1;
                m.head = m.cps[&id].clone();
            }
            Op::Clone(v, c, d) => {
                let (name, new) = (NAMES[v], NAMES[d]);
                let Some(id) = self.cp_pick(name, c) else {
                    return;
                };
                let r = self.s().clone_volume(name, CheckpointId(id), new);
                if self.model.contains_key(new) {
                    assert!(r.is_err());
                    return;
                }
                r.unwrap();
                let head = self.model[name].cps[&id].clone();
                self.model.insert(
                    new.to_string(),
                    MVol {
                        head,
                        next_cp: 1,
                        ..Default::default()
                    },
                );
            }
            Op::DeleteCheckpoint(v, c) => {
                let name = NAMES[v];
                let Some(id) = self.cp_pick(name, c) else {
                    return;
                };
                self.s().delete_checkpoint(name, CheckpointId(id)).unwrap();
                self.model.get_mut(name).unwrap().cps.remove(&id);
                assert!(self.s().delete_checkpoint(name, CheckpointId(id)).is_err());
            }
            Op::DeleteVolume(v) => {
                let name = NAMES[v];
                let r = self.s().delete_volume(name);
                assert_eq!(r.is_ok(), self.model.remove(name).is_some());
            }
            Op::Gc => {
                let r = self.s().run_all_background_work().unwrap();
                self.take(r);
            }
            Op::Reopen => {
                // Background work left pending must resume after the reopen.
                self.snap = None;
                self.snap = Some(
                    Snapshotter::open(
                        &self.path,
                        Options {
                            max_read_depth: 2,
                            ..Default::default()
                        },
                    )
                    .unwrap(),
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model(ops in prop::collection::vec(op(), 1..80)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let snap = Snapshotter::open(&path, Options { max_read_depth: 2, ..Default::default() }).unwrap();
        let mut h = Harness {
            _dir: dir,
            path,
            snap: Some(snap),
            model: HashMap::new(),
            next_token: 0,
            written: HashSet::new(),
            released: HashSet::new(),
        };
        h.apply(&Op::Create(0));
        for op in &ops {
            h.apply(op);
            h.check();
        }
        // Delete everything: every block written must come back exactly once.
        for name in NAMES {
            if h.model.remove(name).is_some() {
                h.s().delete_volume(name).unwrap();
            }
            let r = h.s().run_all_background_work().unwrap();
            h.take(r);
        }
        prop_assert!(h.s().group_refs().is_empty(), "references left: {:?}", h.s().group_refs());
        let leaked: Vec<&u64> = h.written.difference(&h.released).collect();
        prop_assert!(leaked.is_empty(), "leaked blocks {:?}", leaked);
    }
}
