//! A full disk (docs/reliability.md): blockd's data directory on a small tmpfs mounted by
//! the test (needs root; unmounted on drop, also when the test fails). NBD writes fill it:
//! they must fail with `ENOSPC` on the wire while the daemon stays up, everything
//! acknowledged before stays readable, and once space is freed writes succeed again, and
//! survive a restart.

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::nbd::{Client, ENOSPC, NbdError, block_stamp, stamped_block};
use tests::{Daemon, run, text};

/// A tmpfs mounted for the life of the value.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = run(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
                .arg("tmpfs")
                .arg(dir),
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "mounting a tmpfs at {} failed (this test needs root): {}",
            dir.display(),
            text(&out.stderr)
        );
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still holds a file (a daemon that did not die yet): detach it.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

const MIB: u64 = 1 << 20;

fn chunk(index: u64, stamp: u64) -> Vec<u8> {
    let mut buf = Vec::with_capacity(MIB as usize);
    for lba in index * 256..(index + 1) * 256 {
        buf.extend_from_slice(&stamped_block(lba, stamp));
    }
    buf
}

fn check(c: &mut Client, acked: &[u64]) {
    for (i, stamp) in acked.iter().enumerate() {
        let data = c
            .read(i as u64 * MIB, MIB as u32)
            .unwrap_or_else(|e| panic!("reading acknowledged MiB {i}: {e}"));
        for (k, b) in data.chunks(4096).enumerate() {
            let lba = i as u64 * 256 + k as u64;
            let got = block_stamp(lba, b).unwrap_or_else(|e| panic!("block {lba} {e}"));
            assert_eq!(got, *stamp, "block {lba} lost its acknowledged content");
        }
    }
}

fn disk_full_scenario(object_store: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    let _fs = Tmpfs::mount(&mnt, "48M");
    // Space the test frees later.
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![0x5a; 12 * MIB as usize]).unwrap();
    let data_dir = mnt.join("blockd");
    let object_store = match object_store {
        "file" => format!("file://{}", data_dir.join("objects").display()),
        other => other.to_string(),
    };
    let cfg = format!(
        "[storage]\nsegment_size = \"1M\"\nmetadata_cache = \"8M\"\n[object_store]\nurl = \"{object_store}\"\n"
    );
    let mut d = Daemon::start_config(&data_dir, &cfg, &[]);
    d.cli_ok(&["volume", "create", "v", "--size", "256M"]);
    let mut c = Client::connect(&d.nbd_socket(), "v").unwrap();
    // Fill: 1 MiB FUA writes of distinct content until the disk is full.
    let mut acked: Vec<u64> = Vec::new();
    let errno = loop {
        let i = acked.len() as u64;
        assert!(i < 256, "wrote the whole volume without filling a 48M disk");
        match c.write(i * MIB, &chunk(i, 1), true) {
            Ok(()) => acked.push(1),
            Err(NbdError::Errno(e)) => break e,
            Err(e) => panic!("write {i} broke the connection instead of failing: {e}"),
        }
    };
    assert_eq!(errno, ENOSPC, "a full disk must be ENOSPC on the wire");
    eprintln!("disk full after {} MiB acknowledged", acked.len());
    // The daemon is up, the connection usable, the admin API answers, and everything
    // acknowledged reads back.
    assert!(d.is_running(), "blockd died on a full disk");
    d.cli_ok(&["status"]);
    check(&mut c, &acked);
    // Writes keep failing cleanly while the disk is full (and so does a flush or succeed).
    let i = acked.len() as u64;
    match c.write(i * MIB, &chunk(i, 1), true) {
        Err(NbdError::Errno(e)) => assert_eq!(e, ENOSPC),
        Ok(()) => acked.push(1), // a release made room meanwhile
        Err(e) => panic!("second write on a full disk broke the connection: {e}"),
    }
    let _ = c.flush();
    // A checkpoint is metadata only: it either works or fails cleanly.
    let _ = d.cli(&["checkpoint", "create", "v"]);
    assert!(d.is_running(), "blockd died on a full disk");

    // Now leave no byte free at all (the test fills what the daemon's preallocation left),
    // so metadata writes (RocksDB's log) fail too; small writes into space the daemon had
    // preallocated may still succeed, others fail with ENOSPC or EIO, never hang.
    let filler2 = mnt.join("filler2");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler2).unwrap();
        let block = vec![0xa5u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let mut small_failures = 0;
    for k in 0..64u64 {
        let lba = k * 17 % (acked.len() as u64 * 256);
        let stamp = acked[(lba / 256) as usize];
        match c.write(lba * 4096, &stamped_block(lba, stamp), true) {
            Ok(()) => {}
            Err(NbdError::Errno(e)) => {
                assert!(
                    e == ENOSPC || e == tests::nbd::EIO,
                    "errno {e} on a full disk"
                );
                small_failures += 1;
            }
            Err(e) => panic!("a write on a full disk broke the connection: {e}"),
        }
    }
    eprintln!("{small_failures} of 64 small writes failed with no space left at all");
    assert!(d.is_running(), "blockd died on a full disk");
    check(&mut c, &acked);
    std::fs::remove_file(&filler2).unwrap();

    // Free space: writes succeed again (after a few tries at most: space comes back as
    // soon as the filesystem has it).
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut extra = 0;
    while extra < 4 {
        let i = acked.len() as u64;
        match c.write(i * MIB, &chunk(i, 2), true) {
            Ok(()) => {
                acked.push(2);
                extra += 1;
            }
            Err(NbdError::Errno(e)) if Instant::now() < deadline => {
                eprintln!("write after freeing space: errno {e}; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("writes do not recover after space was freed: {e}"),
        }
    }
    // Overwrites of old data work too, and a flush.
    c.write(0, &chunk(0, 3), true).unwrap();
    acked[0] = 3;
    c.flush().unwrap();
    check(&mut c, &acked);
    c.disconnect();
    d.cli_ok(&["checkpoint", "create", "v"]);
    // Everything is still there after a restart.
    d.stop();
    d.restart();
    let mut c = Client::connect(&d.nbd_socket(), "v").unwrap();
    check(&mut c, &acked);
    c.disconnect();
    d.stop();
}

#[test]
fn full_disk_gives_enospc_keeps_acknowledged_data_and_recovers() {
    disk_full_scenario("none");
}

#[test]
fn full_disk_with_object_tier_on_the_same_disk() {
    // The default object store: a directory under the data directory.
    disk_full_scenario("file");
}
