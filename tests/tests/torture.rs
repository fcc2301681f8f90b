//! Crash torture with the object-store tier on (docs/reliability.md).
//!
//! A worker thread drives `blockd serve` like a user would: FUA writes over NBD (with our
//! own client, so the test knows exactly which write was acknowledged), and, through the
//! CLI, checkpoints, restores, clones, clone deletes, checkpoint deletes and syncs to the
//! object store, while background upload, eviction (a cache budget far below the data) and
//! object GC (no grace period) run inside the daemon. The main thread kills the daemon with
//! SIGKILL at a random moment, restarts it and checks everything it was told is done:
//!
//! - every acknowledged write is in the head; the write in flight is old or new, per block;
//!   no block is torn or holds another block's data;
//! - every checkpoint and clone reported created exists and reads back its content; the
//!   interrupted operation is either done (and then correct) or not done;
//! - at the end, after a last sync, a daemon on an empty data directory opens the volume
//!   from the bucket alone and sees the same head and checkpoints (so no crash left the
//!   bucket inconsistent and GC never deleted an object a manifest needs).
//!
//! Variants: the same with an object store that injects errors, timeouts, latency, lost
//! acknowledgements and corrupted reads (`BLOCKD_TEST_FAULTS`), and an abort at every
//! object-tier failpoint (upload, sync, GC, fetch, eviction, import).
//!
//! `TORTURE_CYCLES` (default 10) sets the kill cycles of each kill -9 test.

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tests::nbd::{Client, block_stamp, stamped_block};
use tests::{Daemon, bin_path, free_port, http_get, metric_sum, run, text};

const VOL: &str = "v";
const VOL_BYTES: u64 = 8 << 20;
const BLOCKS: u64 = VOL_BYTES / 4096;
const MAX_CHECKPOINTS: usize = 5;
const MAX_CLONES: usize = 2;

/// Stamps per block (0 = zeros).
type Content = Vec<u64>;

/// What the daemon has acknowledged.
#[derive(Debug, Clone)]
struct Model {
    head: Content,
    checkpoints: BTreeMap<u64, Content>,
    clones: BTreeMap<String, Content>,
    next_stamp: u64,
    next_clone: u64,
}

/// The operation under way when the daemon died: its effect may or may not be there.
#[derive(Debug, Clone)]
enum Pending {
    Write {
        lba: u64,
        n: u64,
        stamp: u64,
    },
    Checkpoint {
        content: Content,
    },
    Restore {
        id: u64,
        old_head: Content,
    },
    Clone {
        name: String,
        content: Content,
    },
    DeleteCheckpoint(u64),
    DeleteClone(String),
    #[allow(dead_code)] // read through Debug, in the cycle log
    Other(&'static str),
}

#[derive(Debug)]
struct Shared {
    model: Model,
    pending: Option<Pending>,
    ops_done: u64,
    writes_acked: u64,
    syncs_failed: u64,
}

/// Drives the daemon through its NBD socket and CLI, from any thread.
#[derive(Clone)]
struct Driver {
    data_dir: PathBuf,
    shared: Arc<Mutex<Shared>>,
    /// Set before the daemon is killed (or may abort at a failpoint): failures after it
    /// are expected and end the worker; failures before it fail the test.
    dying: Arc<AtomicBool>,
    /// Syncs may fail (the store injects permanent-looking faults).
    faulty_store: bool,
}

fn cli(data_dir: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(bin_path("blockd"));
    c.arg("--data-dir").arg(data_dir).args(args).arg("--json");
    run(&mut c, Duration::from_secs(120))
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn describe(out: &Output) -> String {
    format!(
        "exit {}: {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

impl Driver {
    fn socket(&self) -> PathBuf {
        self.data_dir.join("nbd.sock")
    }

    fn model(&self) -> Model {
        self.shared.lock().unwrap().model.clone()
    }

    fn begin(&self, p: Pending) {
        self.shared.lock().unwrap().pending = Some(p);
    }

    fn done(&self, f: impl FnOnce(&mut Model)) {
        let mut s = self.shared.lock().unwrap();
        f(&mut s.model);
        s.pending = None;
        s.ops_done += 1;
    }

    /// A CLI call that must succeed; retried while the volume is busy (an NBD connection
    /// that just closed may still be detaching).
    fn admin(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = cli(&self.data_dir, args);
            if out.status.success() {
                return Ok(json(&out));
            }
            if out.status.code() == Some(5) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            return Err(format!("blockd {args:?}: {}", describe(&out)));
        }
    }

    fn connect(&self, export: &str) -> Result<Client, String> {
        Client::connect(&self.socket(), export).map_err(|e| format!("connect {export}: {e}"))
    }

    /// A batch of FUA writes of 1..=8 blocks at random places, one at a time.
    fn writes(&self, rng: &mut impl Rng, count: usize) -> Result<(), String> {
        let mut c = self.connect(VOL)?;
        for _ in 0..count {
            let n = rng.random_range(1..=8u64);
            let lba = rng.random_range(0..=BLOCKS - n);
            let stamp = {
                let mut s = self.shared.lock().unwrap();
                s.model.next_stamp += 1;
                s.model.next_stamp
            };
            let mut buf = Vec::with_capacity(n as usize * 4096);
            for b in lba..lba + n {
                buf.extend_from_slice(&stamped_block(b, stamp));
            }
            self.begin(Pending::Write { lba, n, stamp });
            c.write(lba * 4096, &buf, true)
                .map_err(|e| format!("write {lba}+{n}: {e}"))?;
            self.done(|m| m.head[lba as usize..(lba + n) as usize].fill(stamp));
            self.shared.lock().unwrap().writes_acked += 1;
        }
        c.disconnect();
        Ok(())
    }

    fn checkpoint(&self) -> Result<(), String> {
        let content = self.model().head;
        self.begin(Pending::Checkpoint {
            content: content.clone(),
        });
        let v = self.admin(&["checkpoint", "create", VOL])?;
        let id = v["id"].as_u64().ok_or(format!("no id in {v}"))?;
        self.done(|m| {
            m.checkpoints.insert(id, content);
        });
        Ok(())
    }

    fn restore(&self, id: u64) -> Result<(), String> {
        let m = self.model();
        self.begin(Pending::Restore {
            id,
            old_head: m.head.clone(),
        });
        let v = self.admin(&["checkpoint", "restore", VOL, &format!("v{id}")])?;
        let prev = v["previous_head"]["id"]
            .as_u64()
            .ok_or(format!("no previous_head in {v}"))?;
        self.done(|m| {
            let old = std::mem::replace(&mut m.head, m.checkpoints[&id].clone());
            m.checkpoints.insert(prev, old);
        });
        Ok(())
    }

    fn clone_checkpoint(&self, id: u64) -> Result<(), String> {
        let m = self.model();
        let name = format!("c{}", m.next_clone);
        let content = m.checkpoints[&id].clone();
        self.shared.lock().unwrap().model.next_clone += 1;
        self.begin(Pending::Clone {
            name: name.clone(),
            content: content.clone(),
        });
        self.admin(&["volume", "clone", &format!("{VOL}@v{id}"), &name])?;
        self.done(|m| {
            m.clones.insert(name, content);
        });
        Ok(())
    }

    fn delete_checkpoint(&self, id: u64) -> Result<(), String> {
        self.begin(Pending::DeleteCheckpoint(id));
        self.admin(&["checkpoint", "delete", VOL, &format!("v{id}")])?;
        self.done(|m| {
            m.checkpoints.remove(&id);
        });
        Ok(())
    }

    fn delete_clone(&self, name: &str) -> Result<(), String> {
        self.begin(Pending::DeleteClone(name.to_string()));
        self.admin(&["volume", "delete", name])?;
        self.done(|m| {
            m.clones.remove(name);
        });
        Ok(())
    }

    fn sync(&self) -> Result<(), String> {
        self.begin(Pending::Other("sync"));
        match self.admin(&["volume", "sync", VOL]) {
            Ok(_) => {}
            Err(e) if self.faulty_store && !self.dying.load(Ordering::SeqCst) => {
                // Allowed to fail (and must say why) when the store keeps failing.
                eprintln!("sync failed under injected faults (allowed): {e}");
                self.shared.lock().unwrap().syncs_failed += 1;
            }
            Err(e) => return Err(e),
        }
        self.done(|_| {});
        Ok(())
    }

    /// Reads the head through NBD and compares it with the model (reads of evicted data
    /// fetch from the object store).
    fn read_head(&self) -> Result<(), String> {
        self.begin(Pending::Other("read"));
        let m = self.model();
        let mut c = self.connect(VOL)?;
        let data = c.read_all().map_err(|e| format!("read {VOL}: {e}"))?;
        c.disconnect();
        if let Err(e) = compare(&data, &m.head, None) {
            panic!("head read while running differs from the model: {e}");
        }
        self.done(|_| {});
        Ok(())
    }

    /// One random operation.
    fn step(&self, rng: &mut impl Rng) -> Result<(), String> {
        let m = self.model();
        let cps: Vec<u64> = m.checkpoints.keys().copied().collect();
        let pick = |rng: &mut dyn rand::RngCore| cps[rng.random_range(0..cps.len())];
        match rng.random_range(0..20) {
            0..=7 => {
                let count = rng.random_range(1..40);
                self.writes(rng, count)
            }
            8..=9 if cps.len() < MAX_CHECKPOINTS => self.checkpoint(),
            8..=9 => self.delete_checkpoint(pick(rng)),
            10 if !cps.is_empty() => self.restore(pick(rng)),
            11 if !cps.is_empty() && m.clones.len() < MAX_CLONES => {
                self.clone_checkpoint(pick(rng))
            }
            11 | 12 if !m.clones.is_empty() => {
                let name = m.clones.keys().next().unwrap().clone();
                self.delete_clone(&name)
            }
            13 if !cps.is_empty() => self.delete_checkpoint(pick(rng)),
            14..=16 => self.sync(),
            17 => self.read_head(),
            _ => self.checkpoint_or_write(rng),
        }
    }

    fn checkpoint_or_write(&self, rng: &mut impl Rng) -> Result<(), String> {
        if self.model().checkpoints.len() < MAX_CHECKPOINTS {
            self.checkpoint()
        } else {
            self.writes(rng, 10)
        }
    }

    /// Runs random operations until one fails; a failure before `dying` is a test failure.
    fn run_until_failure(&self) {
        let mut rng = rand::rng();
        loop {
            if let Err(e) = self.step(&mut rng) {
                assert!(
                    self.dying.load(Ordering::SeqCst),
                    "operation failed while the daemon was up: {e}"
                );
                return;
            }
        }
    }
}

/// Compares read data with expected stamps; `maybe` = blocks that may hold either stamp.
fn compare(data: &[u8], expect: &[u64], maybe: Option<(u64, u64, u64)>) -> Result<(), String> {
    if data.len() != expect.len() * 4096 {
        return Err(format!("read {} bytes", data.len()));
    }
    for (lba, block) in data.chunks(4096).enumerate() {
        let lba = lba as u64;
        let got = block_stamp(lba, block).map_err(|e| format!("block {lba} {e}"))?;
        let alt = maybe.and_then(|(s, n, st)| (s..s + n).contains(&lba).then_some(st));
        if got != expect[lba as usize] && Some(got) != alt {
            return Err(format!(
                "block {lba}: stamp {got}, expected {} (in flight: {alt:?})",
                expect[lba as usize]
            ));
        }
    }
    Ok(())
}

fn stamps(data: &[u8]) -> Content {
    data.chunks(4096)
        .enumerate()
        .map(|(lba, b)| block_stamp(lba as u64, b).unwrap())
        .collect()
}

fn read_volume(data_dir: &Path, name: &str) -> Vec<u8> {
    let mut c = Client::connect(&data_dir.join("nbd.sock"), name)
        .unwrap_or_else(|e| panic!("connect {name}: {e}\n{}", log_tail(data_dir)));
    let data = c
        .read_all()
        .unwrap_or_else(|e| panic!("read {name}: {e}\n{}", log_tail(data_dir)));
    c.disconnect();
    data
}

/// The daemon log's last lines (the test's tempdir, and the log with it, is gone after a
/// failure), so a failed read says what the daemon saw.
fn log_tail(data_dir: &Path) -> String {
    format!(
        "last lines of the daemon log:\n{}",
        Daemon::log_tail(data_dir, 80)
    )
}

/// Reads checkpoint `id` of the volume through a temporary clone.
fn read_checkpoint(d: &Driver, id: u64) -> Vec<u8> {
    let tmp = "verify-tmp";
    d.admin(&["volume", "clone", &format!("{VOL}@v{id}"), tmp])
        .unwrap_or_else(|e| panic!("{e}"));
    let data = read_volume(&d.data_dir, tmp);
    d.admin(&["volume", "delete", tmp])
        .unwrap_or_else(|e| panic!("{e}"));
    data
}

/// After a restart: reconciles the model with what the daemon shows, resolving the
/// interrupted operation, and checks every volume and checkpoint. Returns the blocks read.
fn verify(d: &Driver) -> u64 {
    let (mut m, pending) = {
        let s = d.shared.lock().unwrap();
        (s.model.clone(), s.pending.clone())
    };
    let mut blocks = 0;
    // A clone left by an interrupted verification is not part of the model.
    let vols = d.admin(&["volume", "list"]).unwrap();
    let names: Vec<String> = vols["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    if names.iter().any(|n| n == "verify-tmp") {
        d.admin(&["volume", "delete", "verify-tmp"]).unwrap();
    }
    assert!(names.iter().any(|n| n == VOL), "volume {VOL} lost");

    // Head.
    let head = read_volume(&d.data_dir, VOL);
    blocks += BLOCKS;
    match &pending {
        Some(Pending::Write { lba, n, stamp }) => {
            compare(&head, &m.head, Some((*lba, *n, *stamp)))
                .unwrap_or_else(|e| panic!("head after kill -9: {e}"));
            m.head = stamps(&head);
        }
        Some(Pending::Restore { id, old_head }) => {
            if compare(&head, &m.checkpoints[id], None).is_ok() {
                m.head = m.checkpoints[id].clone();
            } else {
                compare(&head, old_head, None).unwrap_or_else(|e| {
                    panic!("head after a restore interrupted by kill -9 is neither old nor restored: {e}")
                });
            }
        }
        _ => compare(&head, &m.head, None).unwrap_or_else(|e| panic!("head after kill -9: {e}")),
    }

    // Checkpoints.
    let cps = d.admin(&["checkpoint", "list", VOL]).unwrap();
    let listed: Vec<u64> = cps["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect();
    for id in m.checkpoints.keys().copied().collect::<Vec<_>>() {
        if !listed.contains(&id) {
            assert!(
                matches!(pending, Some(Pending::DeleteCheckpoint(p)) if p == id),
                "checkpoint v{id} lost (pending: {pending:?})"
            );
            m.checkpoints.remove(&id);
        }
    }
    for id in listed {
        let data = read_checkpoint(d, id);
        blocks += BLOCKS;
        let expect = match (m.checkpoints.get(&id), &pending) {
            (Some(c), _) => c.clone(),
            (None, Some(Pending::Checkpoint { content })) => content.clone(),
            // The restore committed: its pre_restore checkpoint holds the old head.
            (None, Some(Pending::Restore { old_head, .. })) => old_head.clone(),
            (None, p) => panic!("unexpected checkpoint v{id} (pending: {p:?})"),
        };
        compare(&data, &expect, None).unwrap_or_else(|e| panic!("checkpoint v{id}: {e}"));
        m.checkpoints.insert(id, expect);
    }

    // Clones.
    for name in m.clones.keys().cloned().collect::<Vec<_>>() {
        if !names.contains(&name) {
            assert!(
                matches!(&pending, Some(Pending::DeleteClone(p)) if *p == name),
                "clone {name} lost (pending: {pending:?})"
            );
            m.clones.remove(&name);
        }
    }
    let unknown: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with('c') && !m.clones.contains_key(*n))
        .collect();
    for name in unknown {
        match &pending {
            Some(Pending::Clone { name: p, content }) if p == name => {
                m.clones.insert(name.clone(), content.clone());
            }
            p => panic!("unexpected volume {name} (pending: {p:?})"),
        }
    }
    for (name, content) in &m.clones {
        let data = read_volume(&d.data_dir, name);
        blocks += BLOCKS;
        compare(&data, content, None).unwrap_or_else(|e| panic!("clone {name}: {e}"));
    }
    let mut s = d.shared.lock().unwrap();
    s.model = m;
    s.pending = None;
    blocks
}

fn config(extra: &str) -> String {
    format!(
        "[storage]\nsegment_size = \"1M\"\n\
         [object_store]\ncache_size = \"1M\"\ndirty_limit = \"16M\"\ngc_grace_secs = 0\n{extra}\n"
    )
}

fn new_driver(data_dir: &Path, faulty_store: bool) -> Driver {
    Driver {
        data_dir: data_dir.to_path_buf(),
        shared: Arc::new(Mutex::new(Shared {
            model: Model {
                head: vec![0; BLOCKS as usize],
                checkpoints: BTreeMap::new(),
                clones: BTreeMap::new(),
                next_stamp: 0,
                next_clone: 0,
            },
            pending: None,
            ops_done: 0,
            writes_acked: 0,
            syncs_failed: 0,
        })),
        dying: Arc::new(AtomicBool::new(false)),
        faulty_store,
    }
}

/// Syncs, then opens the volume on a daemon with an empty data directory from the bucket
/// alone and compares its head and checkpoints with the model.
fn cold_open_matches(d: &Driver, objects: &Path, env: &[(&str, &str)]) {
    d.admin(&["volume", "sync", VOL])
        .unwrap_or_else(|e| panic!("final sync: {e}"));
    let m = d.model();
    let dir2 = d.data_dir.with_file_name("cold");
    let cfg = format!("[object_store]\nurl = \"file://{}\"\n", objects.display());
    let cfg_path = dir2.with_extension("toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let mut other = Daemon::start_with(&dir2, env, &["--config", cfg_path.to_str().unwrap()]);
    let d2 = Driver {
        data_dir: dir2.clone(),
        ..d.clone()
    };
    d2.admin(&["volume", "import", VOL, "--force"])
        .unwrap_or_else(|e| panic!("cold open: {e}"));
    compare(&read_volume(&dir2, VOL), &m.head, None)
        .unwrap_or_else(|e| panic!("cold-opened head: {e}"));
    for (id, content) in &m.checkpoints {
        compare(&read_checkpoint(&d2, *id), content, None)
            .unwrap_or_else(|e| panic!("cold-opened checkpoint v{id}: {e}"));
    }
    other.stop();
}

fn cycles() -> usize {
    std::env::var("TORTURE_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

/// The kill -9 loop shared by the plain and the faulty-store tests.
fn kill9_cycles(faults: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("blockd");
    let port = free_port();
    let env: Vec<(&str, &str)> = faults
        .map(|f| vec![("BLOCKD_TEST_FAULTS", f)])
        .unwrap_or_default();
    let cfg_path = dir.path().join("blockd.toml");
    std::fs::write(&cfg_path, config("")).unwrap();
    let port_s = format!("127.0.0.1:{port}");
    let mut daemon = Daemon::start_with(
        &data_dir,
        &env,
        &[
            "--config",
            cfg_path.to_str().unwrap(),
            "--metrics-addr",
            &port_s,
        ],
    );
    let d = new_driver(&data_dir, faults.is_some());
    d.admin(&["volume", "create", VOL, "--size", "8M"]).unwrap();
    let mut rng = rand::rng();
    let (mut verified_blocks, mut faults_injected, mut fetches, mut gc_deleted) =
        (0u64, 0f64, 0f64, 0f64);
    let t0 = Instant::now();
    let n = cycles();
    for cycle in 0..n {
        d.dying.store(false, Ordering::SeqCst);
        let w = d.clone();
        let worker = std::thread::spawn(move || w.run_until_failure());
        std::thread::sleep(Duration::from_millis(rng.random_range(300..3000)));
        if let Some(body) = http_get(port, "/metrics") {
            faults_injected += metric_sum(&body, "chunkstore_object_request_errors_total");
            fetches += metric_sum(&body, "chunkstore_fetches_total");
            gc_deleted += metric_sum(&body, "chunkstore_objects_deleted_total");
        }
        d.dying.store(true, Ordering::SeqCst);
        daemon.kill9();
        if let Err(p) = worker.join() {
            std::panic::resume_unwind(p);
        }
        let pending = d.shared.lock().unwrap().pending.clone();
        daemon.restart_with(&env);
        verified_blocks += verify(&d);
        eprintln!("cycle {cycle}: killed during {pending:?}; verified");
    }
    let s = d.shared.lock().unwrap();
    eprintln!(
        "{n} kill -9 cycles in {:?}: {} operations, {} acknowledged writes, {verified_blocks} blocks verified, {} checkpoints and {} clones at the end, {faults_injected} failed object-store requests (injected faults, and not-found answers), {fetches} lazy fetches, {gc_deleted} objects deleted by GC, {} syncs failed under faults, 0 lost",
        t0.elapsed(),
        s.ops_done,
        s.writes_acked,
        s.model.checkpoints.len(),
        s.model.clones.len(),
        s.syncs_failed
    );
    drop(s);
    if faults.is_some() {
        assert!(
            faults_injected > 0.0,
            "the faulty store injected nothing: is BLOCKD_TEST_FAULTS honoured?"
        );
    }
    cold_open_matches(&d, &data_dir.join("objects"), &[]);
    daemon.stop();
}

#[test]
fn kill9_with_object_tier_keeps_every_acknowledged_block() {
    kill9_cycles(None);
}

#[test]
fn kill9_with_faulty_object_store_keeps_every_acknowledged_block() {
    kill9_cycles(Some(
        "error=0.05,timeout=0.01,timeout_ms=50,latency_ms=1,jitter_ms=10,lost_ack=0.05,corrupt=0.03,corrupt_bits=3",
    ));
}

/// Regression: a segment whose frames were all evicted (punched out of its file) came back
/// after a restart with no blocks at all, and the next read of it panicked in the daemon.
#[test]
fn evicted_segments_read_back_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_config(&dir.path().join("blockd"), &config(""), &[]);
    let dr = new_driver(&d.data_dir, false);
    d.cli_ok(&["volume", "create", VOL, "--size", "8M"]);
    let mut c = Client::connect(&d.nbd_socket(), VOL).unwrap();
    let mut buf = Vec::new();
    for lba in 0..768 {
        buf.extend_from_slice(&stamped_block(lba, 7));
    }
    c.write(0, &buf, true).unwrap();
    c.disconnect();
    d.cli_ok(&["volume", "sync", VOL]);
    // The cache budget (1 MiB) is below the 3 MiB written: wait for eviction.
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.cli_json(&["volume", "stat", VOL])["local_bytes"]
        .as_u64()
        .unwrap()
        > 1 << 20
    {
        assert!(Instant::now() < deadline, "nothing was evicted");
        std::thread::sleep(Duration::from_millis(100));
    }
    d.kill9();
    d.restart();
    let mut expect = vec![0u64; BLOCKS as usize];
    expect[..768].fill(7);
    compare(&read_volume(&dr.data_dir, VOL), &expect, None).unwrap();
    d.stop();
}

/// What reaches each object-tier failpoint.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    /// New writes (sealed segments upload in the background), then a sync.
    WritesAndSync,
    /// Delete the checkpoint that alone holds some chunks, sync (the old manifest no longer
    /// protects them), GC deletes their objects.
    DeleteCheckpointAndSync,
    /// Read evicted data (fetch from the store), which also refills the cache (eviction).
    ReadEvicted,
    /// Cold open on a second daemon.
    Import,
}

const TIER_FAILPOINTS: &[(&str, Trigger)] = &[
    ("chunkstore::upload::before_put", Trigger::WritesAndSync),
    ("chunkstore::upload::before_record", Trigger::WritesAndSync),
    ("blockd::sync::before_manifest", Trigger::WritesAndSync),
    ("blockd::sync::after_manifest", Trigger::WritesAndSync),
    (
        "chunkstore::gc::before_delete",
        Trigger::DeleteCheckpointAndSync,
    ),
    (
        "chunkstore::gc::after_delete",
        Trigger::DeleteCheckpointAndSync,
    ),
    ("chunkstore::fetch::before_get", Trigger::ReadEvicted),
    ("chunkstore::fetch::before_fill", Trigger::ReadEvicted),
    ("chunkstore::evict", Trigger::ReadEvicted),
    ("blockd::import::before_install", Trigger::Import),
];

fn wait_abort(d: &mut Daemon, fp: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.is_running() {
        assert!(
            Instant::now() < deadline,
            "{fp}: the daemon never reached the failpoint"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = d.wait_exit(Duration::from_secs(1));
    assert!(!status.success(), "{fp}: expected an abort, got {status}");
}

/// An abort (like a crash) at every object-tier failpoint; after the restart everything
/// acknowledged is there, the daemon keeps working, and the bucket still opens on an
/// empty host with the same content.
#[test]
fn abort_at_every_object_tier_failpoint_recovers() {
    for (fp, trigger) in TIER_FAILPOINTS {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("blockd");
        let mut daemon = Daemon::start_config(&data_dir, &config(""), &[]);
        let d = new_driver(&data_dir, false);
        let mut rng = rand::rng();
        d.admin(&["volume", "create", VOL, "--size", "8M"]).unwrap();
        // Generation A over 3 MiB, checkpoint v1, sync; generation B over its first 2 MiB
        // (so v1 alone holds two chunks of A), checkpoint v2, sync.
        for (stamp, blocks) in [(1u64, 0..768u64), (2, 0..512)] {
            let mut c = Client::connect(&d.socket(), VOL).unwrap();
            let mut buf = Vec::new();
            for lba in blocks.clone() {
                buf.extend_from_slice(&stamped_block(lba, stamp));
            }
            c.write(blocks.start * 4096, &buf, true).unwrap();
            c.disconnect();
            d.shared.lock().unwrap().model.head[blocks.start as usize..blocks.end as usize]
                .fill(stamp);
            d.shared.lock().unwrap().model.next_stamp = stamp;
            d.checkpoint().unwrap();
            d.sync().unwrap();
        }
        let fps = format!("{fp}=panic");
        daemon.stop();
        if let Trigger::Import = trigger {
            // A second daemon on an empty data dir imports the volume and aborts in the
            // middle; restarted, it imports again and sees everything.
            let dir2 = dir.path().join("cold");
            let cfg = format!(
                "[object_store]\nurl = \"file://{}\"\n",
                data_dir.join("objects").display()
            );
            let cfg_path = dir.path().join("cold.toml");
            std::fs::write(&cfg_path, cfg).unwrap();
            let mut other = Daemon::start_with(
                &dir2,
                &[("FAILPOINTS", fps.as_str())],
                &["--config", cfg_path.to_str().unwrap()],
            );
            let out = cli(&dir2, &["volume", "import", VOL, "--force"]);
            assert!(!out.status.success(), "{fp}: import should have aborted");
            wait_abort(&mut other, fp);
            other.restart();
            let d2 = Driver {
                data_dir: dir2.clone(),
                ..d.clone()
            };
            d2.admin(&["volume", "import", VOL, "--force"])
                .unwrap_or_else(|e| panic!("{fp}: import after the crash: {e}"));
            verify(&d2);
            d2.writes(&mut rng, 20).unwrap();
            d2.checkpoint().unwrap();
            d2.sync().unwrap();
            verify(&d2);
            other.stop();
            eprintln!("{fp}: recovered");
            continue;
        }
        daemon.restart_with(&[("FAILPOINTS", fps.as_str())]);
        d.dying.store(true, Ordering::SeqCst);
        let _ = match trigger {
            Trigger::WritesAndSync => d.writes(&mut rng, 60).and_then(|_| d.sync()),
            // A manifest written before the background GC released the blocks still
            // references their chunks (their deletion waits for the next manifest): sync
            // until GC gets to delete them, which aborts the daemon.
            Trigger::DeleteCheckpointAndSync => d.delete_checkpoint(1).and_then(|_| {
                for _ in 0..100 {
                    d.sync()?;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Ok(())
            }),
            Trigger::ReadEvicted => d.read_head(),
            Trigger::Import => unreachable!(),
        };
        wait_abort(&mut daemon, fp);
        d.dying.store(false, Ordering::SeqCst);
        daemon.restart();
        verify(&d);
        // Keeps working: writes, a checkpoint, a restore, a sync; and the bucket opens on
        // an empty host with exactly that.
        d.writes(&mut rng, 20).unwrap();
        d.checkpoint().unwrap();
        let id = *d.model().checkpoints.keys().next().unwrap();
        d.restore(id).unwrap();
        cold_open_matches(&d, &data_dir.join("objects"), &[]);
        daemon.stop();
        eprintln!("{fp}: recovered");
    }
}
