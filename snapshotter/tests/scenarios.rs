//! Scenario tests of the metadata engine (fake physical addresses).

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use snapshotter::{BLOCK_SIZE, CheckpointId, Error, Mapping, Options, PhysBlock, Snapshotter};
use std::collections::HashSet;

struct Env {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    snap: Option<Snapshotter>,
    next_phys: u64,
}

impl Env {
    fn new() -> Env {
        Self::with(Options::default())
    }
    fn with(opts: Options) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let snap = Snapshotter::open(&path, opts).unwrap();
        Env {
            _dir: dir,
            path,
            snap: Some(snap),
            next_phys: 1,
        }
    }
    fn s(&self) -> &Snapshotter {
        self.snap.as_ref().unwrap()
    }
    fn reopen(&mut self) {
        self.snap = None;
        self.snap = Some(Snapshotter::open(&self.path, Options::default()).unwrap());
    }
    /// Writes `n` blocks at `lba`, returns the phys addresses used.
    fn write(&mut self, vol: &str, lba: u64, n: usize) -> Vec<PhysBlock> {
        let blocks: Vec<(PhysBlock, u32)> = (0..n)
            .map(|_| {
                let p = self.next_phys;
                self.next_phys += 1;
                (
                    PhysBlock {
                        group: p / 8,
                        index: (p % 8) as u32,
                    },
                    p as u32,
                )
            })
            .collect();
        self.s()
            .volume(vol)
            .unwrap()
            .commit_write(lba, &blocks)
            .unwrap();
        blocks.into_iter().map(|(p, _)| p).collect()
    }
    fn read(&self, vol: &str, lba: u64, n: usize) -> Vec<Option<u32>> {
        self.s()
            .volume(vol)
            .unwrap()
            .lookup(lba, n)
            .unwrap()
            .into_iter()
            .map(|m| match m {
                Mapping::Zero => None,
                Mapping::Data { crc, .. } => Some(crc),
            })
            .collect()
    }
}

#[test]
fn create_list_stat_delete() {
    let e = Env::new();
    let s = e.s();
    let v = s.create_volume("a", 1 << 20).unwrap();
    assert_eq!(v.size_bytes, 1 << 20);
    assert!(matches!(
        s.create_volume("a", 1 << 20),
        Err(Error::VolumeExists(_))
    ));
    assert!(matches!(
        s.create_volume("bad/name", 4096),
        Err(Error::InvalidName(_))
    ));
    assert!(matches!(
        s.create_volume("-x", 4096),
        Err(Error::InvalidName(_))
    ));
    assert!(matches!(
        s.create_volume("b", 1000),
        Err(Error::InvalidSize(1000))
    ));
    assert!(matches!(
        s.create_volume("b", 0),
        Err(Error::InvalidSize(0))
    ));
    s.create_volume("b", 8192).unwrap();
    let names: Vec<String> = s.list_volumes().into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["a", "b"]);
    s.delete_volume("a").unwrap();
    assert!(matches!(s.stat("a"), Err(Error::VolumeNotFound(_))));
    assert!(matches!(
        s.delete_volume("a"),
        Err(Error::VolumeNotFound(_))
    ));
}

#[test]
fn out_of_range_is_rejected() {
    let mut e = Env::new();
    e.s().create_volume("v", 4 * BLOCK_SIZE).unwrap();
    e.write("v", 3, 1);
    let h = e.s().volume("v").unwrap();
    assert!(h.lookup(3, 2).is_err());
    assert!(h.commit_zero(4, 1).is_err());
    assert!(h.lookup(u64::MAX, 2).is_err());
}

#[test]
fn overwrite_releases_old_block_unless_checkpointed() {
    let mut e = Env::new();
    e.s().create_volume("v", 1 << 20).unwrap();
    let first = e.write("v", 0, 1);
    let h = e.s().volume("v").unwrap();
    // Overwrite without checkpoint: old block released.
    let c = h
        .commit_write(
            0,
            &[(
                PhysBlock {
                    group: 1000,
                    index: 0,
                },
                7,
            )],
        )
        .unwrap();
    assert_eq!(c.released.blocks, first);
    // Checkpoint, then overwrite: nothing released, checkpoint-only bytes appear.
    let cp = e.s().create_checkpoint("v", "one").unwrap();
    assert_eq!(cp.id, CheckpointId(1));
    let c = h
        .commit_write(
            0,
            &[(
                PhysBlock {
                    group: 1000,
                    index: 1,
                },
                8,
            )],
        )
        .unwrap();
    assert!(c.released.blocks.is_empty());
    let st = e.s().stat("v").unwrap();
    assert_eq!(st.head_bytes, BLOCK_SIZE);
    assert_eq!(st.checkpoint_only_bytes, BLOCK_SIZE);
    assert_eq!(st.owned_bytes, 2 * BLOCK_SIZE);
    // Deleting the checkpoint lets GC release the old version.
    e.s().delete_checkpoint("v", cp.id).unwrap();
    let r = e.s().run_all_background_work().unwrap();
    assert_eq!(
        r.blocks,
        vec![PhysBlock {
            group: 1000,
            index: 0
        }]
    );
    let st = e.s().stat("v").unwrap();
    assert_eq!(st.checkpoint_only_bytes, 0);
    assert_eq!(st.owned_bytes, BLOCK_SIZE);
}

#[test]
fn restore_is_undoable_and_counts_follow() {
    let mut e = Env::new();
    e.s().create_volume("v", 1 << 20).unwrap();
    e.write("v", 0, 4);
    let cp1 = e.s().create_checkpoint("v", "").unwrap();
    let before = e.read("v", 0, 8);
    e.write("v", 2, 4);
    e.s().volume("v").unwrap().commit_zero(0, 1).unwrap();
    let after = e.read("v", 0, 8);
    assert_ne!(before, after);
    let auto = e.s().restore("v", cp1.id).unwrap();
    assert_eq!(auto.id, CheckpointId(2));
    assert_eq!(e.read("v", 0, 8), before);
    assert_eq!(e.s().stat("v").unwrap().head_bytes, 4 * BLOCK_SIZE);
    // Undo: restore the automatic checkpoint.
    e.s().restore("v", auto.id).unwrap();
    assert_eq!(e.read("v", 0, 8), after);
    assert_eq!(e.s().stat("v").unwrap().head_bytes, 5 * BLOCK_SIZE);
    // Everything survives a reopen.
    e.reopen();
    assert_eq!(e.read("v", 0, 8), after);
    let ids: Vec<String> = e
        .s()
        .list_checkpoints("v")
        .unwrap()
        .iter()
        .map(|c| c.id.to_string())
        .collect();
    assert_eq!(ids, ["v1", "v2", "v3"]);
}

#[test]
fn clone_is_independent() {
    let mut e = Env::new();
    e.s().create_volume("base", 1 << 20).unwrap();
    e.write("base", 0, 4);
    let cp = e.s().create_checkpoint("base", "golden").unwrap();
    let info = e.s().clone_volume("base", cp.id, "child").unwrap();
    assert_eq!(info.cloned_from.as_deref(), Some("base@v1"));
    assert_eq!(info.head_bytes, 4 * BLOCK_SIZE);
    assert_eq!(info.head_shared_bytes, 4 * BLOCK_SIZE);
    assert_eq!(info.owned_bytes, 0);
    let base_view = e.read("base", 0, 4);
    assert_eq!(e.read("child", 0, 4), base_view);
    e.write("child", 1, 1);
    e.write("base", 2, 1);
    assert_ne!(e.read("child", 1, 1), base_view[1..2]);
    assert_eq!(e.read("child", 2, 1), base_view[2..3]);
    let st = e.s().stat("child").unwrap();
    assert_eq!(
        (st.head_bytes, st.owned_bytes),
        (4 * BLOCK_SIZE, BLOCK_SIZE)
    );
    // Deleting the source keeps what the clone reads.
    e.s().delete_checkpoint("base", cp.id).unwrap();
    e.s().delete_volume("base").unwrap();
    e.s().run_all_background_work().unwrap();
    assert_eq!(e.read("child", 0, 1), base_view[0..1]);
    assert_eq!(e.read("child", 3, 1), base_view[3..4]);
    e.reopen();
    assert_eq!(e.read("child", 3, 1), base_view[3..4]);
    assert!(matches!(
        e.s().clone_volume("child", CheckpointId(9), "x"),
        Err(Error::CheckpointNotFound { .. })
    ));
}

#[test]
fn deleting_everything_releases_everything() {
    let mut e = Env::new();
    e.s().create_volume("a", 1 << 20).unwrap();
    let mut written: HashSet<PhysBlock> = HashSet::new();
    written.extend(e.write("a", 0, 8));
    let c1 = e.s().create_checkpoint("a", "").unwrap();
    written.extend(e.write("a", 4, 8));
    e.s().clone_volume("a", c1.id, "b").unwrap();
    written.extend(e.write("b", 2, 3));
    e.s().restore("a", c1.id).unwrap();
    written.extend(e.write("a", 0, 2));
    let mut released: HashSet<PhysBlock> = HashSet::new();
    let mut take = |r: snapshotter::Released| {
        for b in r.blocks {
            assert!(released.insert(b), "{b:?} released twice");
        }
    };
    for name in ["a", "b"] {
        e.s().delete_volume(name).unwrap();
        take(e.s().run_all_background_work().unwrap());
    }
    // Overwrites released some blocks directly in the data path; count those too.
    let live: usize = e.s().group_refs().values().map(|n| *n as usize).sum();
    assert_eq!(live, 0, "references left: {:?}", e.s().group_refs());
    assert!(released.is_subset(&written));
}

#[test]
fn deep_restore_chains_get_flattened() {
    let mut e = Env::with(Options {
        max_read_depth: 3,
        ..Default::default()
    });
    e.s().create_volume("v", 64 * BLOCK_SIZE).unwrap();
    e.write("v", 0, 64);
    let mut expect = e.read("v", 0, 64);
    for round in 0..10u64 {
        let cp = e.s().create_checkpoint("v", "").unwrap();
        e.write("v", round, 1);
        e.s().restore("v", cp.id).unwrap();
        e.s().run_all_background_work().unwrap();
        assert_eq!(e.read("v", 0, 64), expect, "round {round}");
        assert!(e.s().stat("v").unwrap().read_depth <= 3);
        e.write("v", 63 - round, 1);
        expect = e.read("v", 0, 64);
    }
    e.reopen();
    assert_eq!(e.read("v", 0, 64), expect);
}

/// Exports a volume and imports it into another database (another host), page by page.
fn transplant(from: &Snapshotter, name: &str, to: &Snapshotter, new_name: &str) {
    let export = from.export_volume(name).unwrap();
    let mut pages = |t: snapshotter::TimelineId| {
        let mut all = Vec::new();
        for start in from.export_page_starts(t).unwrap() {
            all.extend(from.export_page(t, start).unwrap());
        }
        Ok(all)
    };
    to.import_volume(new_name, &export, &mut pages).unwrap();
}

#[test]
fn export_import_reproduces_head_and_checkpoints() {
    let mut a = Env::new();
    a.s().create_volume("base", 64 * BLOCK_SIZE).unwrap();
    a.write("base", 0, 40);
    let golden = a.s().create_checkpoint("base", "golden").unwrap();
    a.s().clone_volume("base", golden.id, "vm").unwrap();
    a.write("vm", 10, 5);
    let c1 = a.s().create_checkpoint("vm", "").unwrap();
    a.write("vm", 30, 20);
    a.s().volume("vm").unwrap().commit_zero(0, 2).unwrap();
    a.s().restore("vm", c1.id).unwrap(); // v2 = the head before
    a.write("vm", 60, 4);
    let views = |e: &Env, name: &str| {
        let mut v = vec![e.read(name, 0, 64)];
        for cp in e.s().list_checkpoints(name).unwrap() {
            let r = e.s().checkpoint_reader(name, cp.id).unwrap();
            v.push(
                r.lookup(0, 64)
                    .unwrap()
                    .into_iter()
                    .map(|m| match m {
                        Mapping::Zero => None,
                        Mapping::Data { crc, .. } => Some(crc),
                    })
                    .collect(),
            );
        }
        v
    };
    let want = views(&a, "vm");
    let b = Env::new();
    b.s().create_volume("other", 4096).unwrap(); // ids differ between the hosts
    transplant(a.s(), "vm", b.s(), "vm2");
    assert_eq!(views(&b, "vm2"), want);
    let (sa, sb) = (a.s().stat("vm").unwrap(), b.s().stat("vm2").unwrap());
    assert_eq!(
        (
            sa.head_bytes,
            sa.owned_bytes,
            sa.checkpoint_only_bytes,
            sa.checkpoints
        ),
        (
            sb.head_bytes,
            sb.owned_bytes,
            sb.checkpoint_only_bytes,
            sb.checkpoints
        )
    );
    // The import keeps working: write, checkpoint, restore, delete everything.
    let mut b = b;
    b.write("vm2", 5, 3);
    let cp = b.s().create_checkpoint("vm2", "").unwrap();
    b.s().restore("vm2", cp.id).unwrap();
    b.reopen();
    assert_eq!(
        b.read("vm2", 5, 3).iter().filter(|x| x.is_some()).count(),
        3
    );
    b.s().delete_volume("vm2").unwrap();
    b.s().run_all_background_work().unwrap();
    let live: i64 = b.s().group_refs().values().sum();
    assert_eq!(live, 0, "importing and deleting leaves no references");
}

#[test]
fn relocation_moves_unshared_blocks_and_keeps_everything_else() {
    use snapshotter::Relocation;
    let mut e = Env::new();
    e.s().create_volume("v", 1 << 20).unwrap();
    let old = e.write("v", 0, 4);
    let crcs = e.read("v", 0, 4);
    let h = e.s().volume("v").unwrap();
    let before = e.s().stat("v").unwrap();
    let to = |i: u32| PhysBlock {
        group: 5000,
        index: i,
    };
    let mv = |lba: u64, i: u32| Relocation {
        lba,
        from: old[lba as usize],
        to: to(i),
        crc: crcs[lba as usize].unwrap(),
    };
    // Block 1 was overwritten since it was read: its move is refused.
    e.write("v", 1, 1);
    let r = h.relocate(&[mv(0, 0), mv(1, 1)]).unwrap();
    assert_eq!(r.moved, 1);
    assert_eq!(r.rejected, vec![to(1)]);
    assert_eq!(r.released.blocks, vec![old[0]]);
    let found = h.lookup_found(0, 1).unwrap()[0].unwrap();
    assert_eq!(
        found.mapping(),
        Mapping::Data {
            phys: to(0),
            crc: crcs[0].unwrap()
        }
    );
    assert_eq!(e.s().group_ref(5000), 1);
    // A stale `from` (the block already moved) or a wrong crc is refused too.
    let r = h.relocate(&[mv(0, 2)]).unwrap();
    assert_eq!((r.moved, r.rejected.clone()), (0, vec![to(2)]));
    let mut bad = mv(2, 3);
    bad.crc ^= 1;
    assert_eq!(h.relocate(&[bad]).unwrap().moved, 0);
    // Accounting is unchanged: the same bytes, somewhere else.
    let after = e.s().stat("v").unwrap();
    assert_eq!(after.head_bytes, before.head_bytes);
    assert_eq!(after.owned_bytes, before.owned_bytes);
    assert_eq!(after.checkpoint_only_bytes, 0);
    // A checkpoint sees block 2: it stays where it is (a clone may copy its address).
    let cp = e.s().create_checkpoint("v", "").unwrap();
    let r = h.relocate(&[mv(2, 4)]).unwrap();
    assert_eq!(r.moved, 0);
    e.s().delete_checkpoint("v", cp.id).unwrap();
    e.s().run_all_background_work().unwrap();
    assert_eq!(h.relocate(&[mv(2, 5)]).unwrap().moved, 1);
    // Out of range is an error, not a silent no-op.
    let mut far = mv(3, 6);
    far.lba = 1 << 30;
    assert!(h.relocate(&[far]).is_err());
    // Durable: the moved addresses survive a reopen, data reads the same.
    drop(h);
    e.reopen();
    assert_eq!(e.read("v", 0, 4)[0], crcs[0]);
    assert_eq!(e.read("v", 0, 4)[2], crcs[2]);
    assert_eq!(e.s().group_ref(5000), 2);
    let got: Vec<PhysBlock> = e
        .s()
        .volume("v")
        .unwrap()
        .lookup(0, 3)
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            Mapping::Data { phys, .. } => Some(phys),
            Mapping::Zero => None,
        })
        .collect();
    assert_eq!(got[0], to(0));
    assert_eq!(got[2], to(5));
}
