//! The object-store tier end to end (docs/object-tier.md): real `blockd` daemons against a
//! real S3 server (moto, started per test on a free port; see [`Moto`]), driven by the CLI
//! and real NBD clients (qemu-io, qemu-img).
//!
//! - a volume opens on a fresh host from the bucket alone: head and every checkpoint;
//! - fencing: a daemon whose volume was taken over cannot write it (NBD or manifest) until
//!   it claims it back;
//! - a TRIM followed by a sync lowers the billed bytes and GC deletes the chunk objects;
//! - deleting a synced volume removes its manifests and, after GC, its chunk objects.
//!
//! moto is installed by scripts/setup.sh; without it these tests fail, they do not skip.

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use rand::RngCore;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};
use tests::{Daemon, Moto, dump, qemu_img, qemu_io, qemu_io_ok, text};

const MIB: u64 = 1 << 20;

/// Exit status and combined output of a CLI call.
fn outcome(out: &Output) -> (i32, String) {
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

fn stat_u64(d: &Daemon, vol: &str, field: &str) -> u64 {
    let st = d.cli_json(&["volume", "stat", vol]);
    st[field]
        .as_u64()
        .unwrap_or_else(|| panic!("volume stat {vol}: no {field} in {st}"))
}

/// Polls `f` every 200 ms until it returns `Ok`, failing with `what` and the last `Err`
/// (the state seen) after `timeout`.
fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; last seen: {last}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The volume's expected content, kept in memory and applied through NBD in lockstep.
struct Model {
    data: Vec<u8>,
    scratch: std::path::PathBuf,
}

impl Model {
    fn new(size: u64, scratch: &Path) -> Model {
        Model {
            data: vec![0; size as usize],
            scratch: scratch.to_path_buf(),
        }
    }

    /// Writes `len` random bytes at `off` into the volume behind `uri` and into the model.
    fn write_random(&mut self, uri: &str, off: u64, len: u64) {
        let mut buf = vec![0u8; len as usize];
        rand::rng().fill_bytes(&mut buf);
        let file = self.scratch.join(format!("w-{off}-{len}.bin"));
        std::fs::write(&file, &buf).unwrap();
        qemu_io_ok(
            uri,
            &[&format!("write -s {} {off} {len}", file.display()), "flush"],
        );
        std::fs::remove_file(&file).unwrap();
        self.data[off as usize..(off + len) as usize].copy_from_slice(&buf);
    }

    /// Discards (NBD TRIM) a range: it reads back as zeros.
    fn discard(&mut self, uri: &str, off: u64, len: u64) {
        qemu_io_ok(uri, &[&format!("discard {off} {len}"), "flush"]);
        self.data[off as usize..(off + len) as usize].fill(0);
    }

    /// Checks the volume against the model (a full dump over NBD) and saves the model as a
    /// raw image `name.raw` for later `qemu-img compare`.
    fn check_and_save(&self, uri: &str, name: &str) -> std::path::PathBuf {
        let got = dump(uri, &self.scratch);
        assert!(
            got == self.data,
            "{name}: volume content differs from the model at byte {:?}",
            got.iter().zip(&self.data).position(|(a, b)| a != b)
        );
        let file = self.scratch.join(format!("{name}.raw"));
        std::fs::write(&file, &self.data).unwrap();
        file
    }
}

/// `qemu-img compare` of a raw image file with an NBD export: identical content.
fn assert_same(expected: &Path, uri: &str, what: &str) {
    let out = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        expected.to_str().unwrap(),
        uri,
    ]);
    assert!(
        out.status.success(),
        "{what}: qemu-img compare says the content differs (status {}): {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Whether a qemu-io write to `uri` succeeded (qemu-io exits 0 even when a write fails).
fn nbd_write(uri: &str, cmd: &str) -> Result<(), String> {
    let out = qemu_io(uri, &[cmd, "flush"]);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    if out.status.success() && all.contains("wrote ") && !all.contains("failed") {
        Ok(())
    } else {
        Err(all)
    }
}

fn chunk_objects(moto: &Moto, prefix: &str) -> Vec<(String, u64)> {
    moto.list(&format!("{prefix}/chunks/"))
}

#[test]
fn cold_open_from_s3_reproduces_head_and_checkpoints() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let dir_a = dir.path().join("a");
    let size = 64 * MIB;

    let mut a = Daemon::start_config(&dir_a, &moto.blockd_config("cold", ""), &[]);
    a.cli_ok(&["volume", "create", "vol", "--size", "64M"]);
    let uri = a.uri("vol");
    let mut m = Model::new(size, &scratch);

    // v1: data at the start, in the middle, in the last MiB, and a few unaligned-to-MiB
    // 4 KiB blocks.
    m.write_random(&uri, 0, 8 * MIB);
    m.write_random(&uri, 20 * MIB, 4 * MIB);
    m.write_random(&uri, 40 * MIB, 2 * MIB);
    m.write_random(&uri, 50 * MIB + 12 * 1024, 64 * 1024);
    m.write_random(&uri, size - MIB, MIB);
    let v1 = m.check_and_save(&uri, "v1");
    let cp = a.cli_json(&["checkpoint", "create", "vol"]);
    assert_eq!(cp["id"], 1, "{cp}");

    // v2: overwrites, discards (whole chunks and partial ones) and new data.
    m.write_random(&uri, 3 * MIB, 2 * MIB);
    m.discard(&uri, 21 * MIB, 2 * MIB);
    m.discard(&uri, 40 * MIB + 256 * 1024, 64 * 1024);
    m.write_random(&uri, 30 * MIB, 3 * MIB);
    let v2 = m.check_and_save(&uri, "v2");
    let cp = a.cli_json(&["checkpoint", "create", "vol"]);
    assert_eq!(cp["id"], 2, "{cp}");

    // Head: more of each.
    m.write_random(&uri, 6 * MIB, 2 * MIB);
    m.write_random(&uri, 44 * MIB, 4 * MIB);
    m.discard(&uri, 0, MIB);
    m.write_random(&uri, 50 * MIB, 4096);
    let head = m.check_and_save(&uri, "head");
    let written = stat_u64(&a, "vol", "owned_bytes");

    let r = a.cli_json(&["volume", "sync", "vol"]);
    assert!(r["pages"].as_u64().unwrap() > 0, "{r}");
    assert!(
        !chunk_objects(&moto, "cold").is_empty(),
        "sync uploaded no chunk"
    );
    a.stop();
    drop(a);
    std::fs::remove_dir_all(&dir_a).unwrap();

    // A fresh host with a small cache: everything it reads comes from the bucket.
    let dir_b = dir.path().join("b");
    let b = Daemon::start_config(
        &dir_b,
        &moto.blockd_config("cold", "cache_size = \"4M\""),
        &[],
    );
    // Observed: a clean stop (SIGTERM) does not release the daemon's leases (the engine's
    // shutdown flushes but keeps them, and a restarted daemon takes its volumes back
    // without force), so another daemon is refused, as if A were still running, and needs
    // --force.
    let (code, msg) = outcome(&b.cli(&["volume", "import", "vol"]));
    assert_eq!(
        code, 5,
        "import of a volume whose holder stopped cleanly: {msg}"
    );
    assert!(
        msg.contains("held by") && msg.contains("--force"),
        "unclear refusal: {msg}"
    );
    let imp = b.cli_json(&["volume", "import", "vol", "--force"]);
    assert_eq!(imp["name"], "vol", "{imp}");
    assert!(imp["entries"].as_u64().unwrap() > 0, "{imp}");

    // Cold open is metadata only: no data is on B's disk before the first read.
    let local = stat_u64(&b, "vol", "local_bytes");
    let all_local = b.cli_json(&["status"])["local_bytes"].as_u64().unwrap();
    assert!(
        local < MIB && all_local < MIB,
        "the import downloaded data: volume local_bytes {local}, daemon {all_local} (written {written})"
    );
    let st = b.cli_json(&["volume", "stat", "vol"]);
    assert_eq!(st["size_bytes"], size, "{st}");
    assert_eq!(st["owned_bytes"], written, "{st}");
    let cps = b.cli_json(&["checkpoint", "list", "vol"]);
    let ids: Vec<u64> = cps["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2], "{cps}");

    assert_same(&head, &b.uri("vol"), "head after cold open");
    b.cli_ok(&["volume", "clone", "vol@v1", "c1"]);
    b.cli_ok(&["volume", "clone", "vol@v2", "c2"]);
    assert_same(&v1, &b.uri("c1"), "checkpoint v1 after cold open");
    assert_same(&v2, &b.uri("c2"), "checkpoint v2 after cold open");
    // Everything was read (three times), yet once reads stop, what stays on disk is
    // bounded by the cache budget (4 MiB; eviction runs in the background).
    wait_for(
        Duration::from_secs(20),
        "eviction down to cache_size",
        || {
            let now = b.cli_json(&["status"])["local_bytes"].as_u64().unwrap();
            if now <= 5 * MIB {
                Ok(())
            } else {
                Err(format!("local_bytes {now}"))
            }
        },
    );

    // B owns the volume now: it takes writes, reads them back and syncs them.
    qemu_io_ok(
        &b.uri("vol"),
        &[
            "write -P 0x5c 10M 1M",
            "read -P 0x5c 10M 1M",
            "flush",
            "read -P 0x5c 10M 1M",
        ],
    );
    b.cli_ok(&["volume", "sync", "vol"]);
    // The rest of the head is unchanged by that write.
    qemu_io_ok(&b.uri("vol"), &["read -P 0 0 1M"]);
    let got = dump(&b.uri("vol"), &scratch);
    assert!(
        got[44 << 20..48 << 20] == m.data[44 << 20..48 << 20],
        "B's write changed data it did not touch"
    );
}

#[test]
fn a_fenced_daemon_cannot_write() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = moto.blockd_config("fence", "lease_check_secs = 1");
    let a = Daemon::start_config(&dir.path().join("a"), &cfg, &[]);
    let b = Daemon::start_config(&dir.path().join("b"), &cfg, &[]);
    let manifests = || moto.list("fence/volumes/f/manifest/");

    // f: fenced through `volume sync`; g: through the background lease check alone.
    for v in ["f", "g"] {
        a.cli_ok(&["volume", "create", v, "--size", "16M"]);
        qemu_io_ok(&a.uri(v), &["write -P 0x11 0 4M", "flush"]);
        a.cli_ok(&["volume", "sync", v]);
    }
    let synced_by_a = manifests();
    assert_eq!(synced_by_a.len(), 1, "{synced_by_a:?}");
    // A second daemon cannot create a volume the bucket already has.
    let (code, msg) = outcome(&b.cli(&["volume", "create", "f", "--size", "16M"]));
    assert_ne!(code, 0, "{msg}");
    assert!(msg.contains("import"), "{msg}");
    // Written after the sync: only on A's disk.
    qemu_io_ok(&a.uri("f"), &["write -P 0x22 1M 1M", "flush"]);

    // B cannot take what A holds without --force.
    let (code, msg) = outcome(&b.cli(&["volume", "import", "f"]));
    assert_eq!(code, 5, "import of a held volume: {msg}");
    assert!(
        msg.contains("held by") && msg.contains("--force"),
        "the refusal should name the holder and the way out: {msg}"
    );
    assert!(
        b.cli(&["volume", "stat", "f"]).status.code() == Some(3),
        "a refused import left a local volume behind"
    );
    for v in ["f", "g"] {
        b.cli_ok(&["volume", "import", v, "--force"]);
    }
    // What A synced; A's later write is not in the bucket.
    qemu_io_ok(&b.uri("f"), &["read -P 0x11 0 4M"]);

    // A's sync must not write a manifest over B's: refused as fenced (exit 5, `busy`:
    // error.rs maps EngineError::Fenced to ErrorCode::Busy).
    let (code, msg) = outcome(&a.cli(&["volume", "sync", "f"]));
    assert_eq!(
        code, 5,
        "sync by a daemon whose lease was taken over: {msg}"
    );
    assert!(msg.contains("taken over"), "{msg}");
    assert_eq!(
        manifests(),
        synced_by_a,
        "the fenced daemon wrote a manifest"
    );
    // ...and A's NBD writes fail (EPERM); reads still work.
    let err = nbd_write(&a.uri("f"), "write -P 0x33 0 64k").unwrap_err();
    assert!(err.contains("Operation not permitted"), "{err}");
    qemu_io_ok(&a.uri("f"), &["read -P 0x22 1M 1M"]);

    // g: A has not called sync; the lease check (every second) fences it.
    let err = wait_for(
        Duration::from_secs(20),
        "A's writes to g to fail",
        || match nbd_write(&a.uri("g"), "write -P 0x44 8M 64k") {
            Ok(()) => Err("the write succeeded".to_string()),
            Err(e) => Ok(e),
        },
    );
    assert!(err.contains("Operation not permitted"), "{err}");
    let (code, msg) = outcome(&a.cli(&["volume", "sync", "g"]));
    assert_eq!(code, 5, "{msg}");

    // B writes and syncs; A still cannot sync; the bucket holds B's data.
    qemu_io_ok(&b.uri("f"), &["write -P 0x55 2M 1M", "flush"]);
    b.cli_ok(&["volume", "sync", "f"]);
    let (code, msg) = outcome(&a.cli(&["volume", "sync", "f"]));
    assert_eq!(code, 5, "{msg}");
    let now = manifests();
    assert!(
        now.len() == 1 && now[0].0.contains("/manifest/00000000000000000002-"),
        "expected one manifest of lease generation 2 (B's): {now:?}"
    );
    let c = Daemon::start_config(&dir.path().join("c"), &cfg, &[]);
    c.cli_ok(&["volume", "import", "f", "--as", "probe"]);
    qemu_io_ok(
        &c.uri("probe"),
        &[
            "read -P 0x11 0 2M",
            "read -P 0x55 2M 1M",
            "read -P 0x11 3M 1M",
            "read -P 0 4M 12M",
        ],
    );

    // A takes f back: refused without --force, then A is writable again and B is fenced.
    let (code, msg) = outcome(&a.cli(&["volume", "claim", "f"]));
    assert_eq!(code, 5, "claim of a volume another daemon holds: {msg}");
    assert!(msg.contains("held by"), "{msg}");
    a.cli_ok(&["volume", "claim", "f", "--force"]);
    nbd_write(&a.uri("f"), "write -P 0x66 0 64k").unwrap();
    qemu_io_ok(&a.uri("f"), &["read -P 0x66 0 64k", "read -P 0x22 1M 1M"]);
    a.cli_ok(&["volume", "sync", "f"]);
    let (code, msg) = outcome(&b.cli(&["volume", "sync", "f"]));
    assert_eq!(code, 5, "B's sync after A took f back: {msg}");
    let err = nbd_write(&b.uri("f"), "write -P 0x77 0 64k").unwrap_err();
    assert!(err.contains("Operation not permitted"), "{err}");
}

#[test]
fn trim_then_sync_lowers_stored_bytes() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_config(
        &dir.path().join("d"),
        &moto.blockd_config("trim", "gc_grace_secs = 0"),
        &[],
    );
    d.cli_ok(&["volume", "create", "t", "--size", "64M"]);
    let mut m = Model::new(64 * MIB, dir.path());
    m.write_random(&d.uri("t"), 0, 32 * MIB);
    d.cli_ok(&["volume", "sync", "t"]);

    // Random data does not compress: about 32 MiB stored, in about 32 chunk objects.
    let before = stat_u64(&d, "t", "stored_bytes");
    assert!(
        (30 * MIB..40 * MIB).contains(&before),
        "stored_bytes after writing 32 MiB of random data: {before}"
    );
    let st = d.cli_json(&["volume", "stat", "t"]);
    assert_eq!(st["stored_head_bytes"], before, "{st}");
    assert_eq!(st["stored_checkpoint_only_bytes"], 0, "{st}");
    let objects_before = chunk_objects(&moto, "trim");
    let bucket_bytes: u64 = objects_before.iter().map(|(_, s)| s).sum();
    assert!(
        (30..=40).contains(&objects_before.len()) && bucket_bytes >= before,
        "{} chunk objects, {bucket_bytes} bytes, for {before} stored bytes",
        objects_before.len()
    );

    // Keep the last 4 MiB.
    m.discard(&d.uri("t"), 0, 28 * MIB);
    d.cli_ok(&["volume", "sync", "t"]);
    let after = wait_for(Duration::from_secs(30), "stored_bytes to drop", || {
        let now = stat_u64(&d, "t", "stored_bytes");
        if now <= 8 * MIB {
            Ok(now)
        } else {
            Err(format!("stored_bytes {now}"))
        }
    });
    assert!(
        after >= 3 * MIB,
        "the 4 MiB still written are stored: stored_bytes {after}"
    );
    // GC (grace 0) deletes the objects of the released chunks.
    let objects_after = wait_for(Duration::from_secs(30), "GC of chunk objects", || {
        let objs = chunk_objects(&moto, "trim");
        if objs.len() <= 8 {
            Ok(objs)
        } else {
            Err(format!(
                "{} chunk objects; log:\n{}",
                objs.len(),
                d.log_text()
            ))
        }
    });
    assert!(!objects_after.is_empty());
    for o in &objects_after {
        assert!(objects_before.contains(o), "new object {o:?} after a trim");
    }

    // The data left is intact, in the daemon and from the bucket alone.
    m.check_and_save(&d.uri("t"), "t");
    let e = Daemon::start_config(&dir.path().join("e"), &moto.blockd_config("trim", ""), &[]);
    e.cli_ok(&["volume", "import", "t", "--as", "t2"]);
    let got = dump(&e.uri("t2"), dir.path());
    assert!(got == m.data, "import after GC differs from the model");

    // The daemon that has the data refuses a second import of it (two volumes would own
    // the same blocks: a trim or delete in one would destroy them in the other).
    let (code, msg) = outcome(&d.cli(&["volume", "import", "t", "--as", "t3"]));
    assert_eq!(code, 6, "{msg}");
    assert!(msg.contains("already has data"), "{msg}");
    m.check_and_save(&d.uri("t"), "t");
}

#[test]
fn delete_removes_manifests_and_chunk_objects() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_config(
        &dir.path().join("d"),
        &moto.blockd_config("del", "gc_grace_secs = 0"),
        &[],
    );
    d.cli_ok(&["volume", "create", "gone", "--size", "32M"]);
    d.cli_ok(&["volume", "create", "kept", "--size", "32M"]);
    let mut gone = Model::new(32 * MIB, dir.path());
    gone.write_random(&d.uri("gone"), 0, 8 * MIB);
    d.cli_ok(&["checkpoint", "create", "gone"]);
    gone.write_random(&d.uri("gone"), 4 * MIB, 4 * MIB);
    let mut kept = Model::new(32 * MIB, dir.path());
    kept.write_random(&d.uri("kept"), MIB, 2 * MIB);
    d.cli_ok(&["volume", "sync", "gone"]);
    d.cli_ok(&["volume", "sync", "kept"]);
    assert!(!moto.list("del/volumes/gone/manifest/").is_empty());
    let chunks_with_both = chunk_objects(&moto, "del").len();
    assert!(
        chunks_with_both >= 12 + 2,
        "{chunks_with_both} chunk objects"
    );

    d.cli_ok(&["volume", "delete", "gone"]);
    assert_eq!(
        moto.list("del/volumes/gone/manifest/"),
        [],
        "the deleted volume's manifests are still in the bucket"
    );
    assert!(!moto.list("del/volumes/kept/manifest/").is_empty());
    // Only the other volume's chunks are left once GC ran.
    let left = wait_for(
        Duration::from_secs(30),
        "GC of the deleted volume's chunks",
        || {
            let objs = chunk_objects(&moto, "del");
            if objs.len() <= 4 {
                Ok(objs)
            } else {
                Err(format!(
                    "{} chunk objects; log:\n{}",
                    objs.len(),
                    d.log_text()
                ))
            }
        },
    );
    assert!(
        !left.is_empty(),
        "GC deleted the chunks of the volume that is still there"
    );
    // The name is free in the bucket: another daemon can create it without --force.
    let other = Daemon::start_config(
        &dir.path().join("other"),
        &moto.blockd_config("del", ""),
        &[],
    );
    other.cli_ok(&["volume", "create", "gone", "--size", "32M"]);
    // And the other volume reads back whole from the bucket alone.
    other.cli_ok(&["volume", "import", "kept", "--force"]);
    let got = dump(&other.uri("kept"), dir.path());
    assert!(got == kept.data, "kept volume differs after GC");
}
