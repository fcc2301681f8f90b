//! Real NBD clients (qemu-io, qemu-img, nbdinfo) against `blockd serve`.

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use std::process::Command;
use std::time::Duration;
use tests::{Daemon, block_pattern, dump, load, qemu_img, qemu_io, qemu_io_ok, run, text};

fn daemon() -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("blockd"));
    (dir, d)
}

#[test]
fn qemu_io_patterns_discard_zero_flush() {
    let (_dir, d) = daemon();
    d.cli_ok(&["volume", "create", "v", "--size", "64M"]);
    let uri = d.uri("v");
    qemu_io_ok(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            // sub-block, sector-aligned writes (read-modify-write inside the engine)
            "write -P 0xcd 512 1536",
            "read -P 0xab 0 512",
            "read -P 0xcd 512 1536",
            "read -P 0xab 2048 2048",
            "write -f -P 0xef 4M 64k", // FUA
            "read -P 0xef 4M 64k",
            "discard 256k 256k",
            "read -P 0 256k 256k",
            "read -P 0xab 512k 512k",
            "write -z 8M 1M",
            "read -P 0 8M 1M",
            "write -z 100k 3k", // unaligned write-zeroes inside data
            "read -P 0 100k 3k",
            "read -P 0xab 96k 4k",
            "flush",
            // never-written space reads as zeros
            "read -P 0 32M 1M",
        ],
    );
    // Data survives a reconnect.
    qemu_io_ok(&uri, &["read -P 0xcd 512 1536", "read -P 0xef 4M 64k"]);
    // The wrong pattern is reported: the verification above can fail.
    let out = qemu_io(&uri, &["read -P 0x77 0 4k"]);
    assert!(text(&out.stdout).contains("Pattern verification failed"));
}

#[test]
fn qemu_img_convert_in_and_compare() {
    let (dir, d) = daemon();
    d.cli_ok(&["volume", "create", "img", "--size", "32M"]);
    // A raw image with data, holes and a zero-filled region.
    let mut raw = vec![0u8; 32 << 20];
    for lba in 0..(32u64 << 20) / 4096 {
        if lba % 7 == 3 || (lba / 64) % 3 == 0 {
            continue; // holes
        }
        let off = (lba * 4096) as usize;
        raw[off..off + 4096].copy_from_slice(&block_pattern(1, lba));
    }
    let src = dir.path().join("src.raw");
    std::fs::write(&src, &raw).unwrap();
    load(&src, &d.uri("img"));
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        src.to_str().unwrap(),
        &d.uri("img"),
    ]);
    assert!(
        cmp.status.success(),
        "compare: {}{}",
        text(&cmp.stdout),
        text(&cmp.stderr)
    );
    assert_eq!(dump(&d.uri("img"), dir.path()), raw);
    // Change one block: compare must notice.
    qemu_io_ok(&d.uri("img"), &["write -P 0x42 12M 4k"]);
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        src.to_str().unwrap(),
        &d.uri("img"),
    ]);
    assert_eq!(
        cmp.status.code(),
        Some(1),
        "compare should report a difference"
    );
    // Zero blocks cost nothing: held bytes are the non-zero blocks only (+ the changed one).
    let nonzero = raw
        .chunks(4096)
        .filter(|b| b.iter().any(|x| *x != 0))
        .count() as u64;
    let st = d.cli_json(&["volume", "stat", "img"]);
    assert_eq!(st["head_bytes"].as_u64().unwrap(), (nonzero + 1) * 4096);
}

#[test]
fn nbdinfo_reports_capabilities_and_allocation() {
    let (_dir, d) = daemon();
    d.cli_ok(&["volume", "create", "info", "--size", "16M"]);
    d.cli_ok(&["volume", "create", "other", "--size", "4M"]);
    qemu_io_ok(&d.uri("info"), &["write -P 1 1M 1M"]);
    let out = run(
        Command::new("nbdinfo").args(["--json", &d.uri("info")]),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "info");
    assert_eq!(e["export-size"], 16 << 20);
    for cap in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
        "can_df",
    ] {
        assert_eq!(e[cap], true, "{cap}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(v["protocol"], "newstyle-fixed");
    // base:allocation: data only where written.
    let out = run(
        Command::new("nbdinfo").args(["--map", "--totals", &d.uri("info")]),
        Duration::from_secs(30),
    );
    let totals = text(&out.stdout);
    assert!(out.status.success(), "{totals}{}", text(&out.stderr));
    let data_line = totals
        .lines()
        .find(|l| l.contains("data"))
        .unwrap_or_default();
    assert!(
        data_line.trim_start().starts_with("1048576"),
        "totals:\n{totals}"
    );
    // Export list.
    let out = run(
        Command::new("nbdinfo").args([
            "--list",
            "--json",
            &format!("nbd+unix://?socket={}", d.nbd_socket().display()),
        ]),
        Duration::from_secs(30),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["info", "other"]);
    // Unknown export: a clear failure.
    let out = run(
        Command::new("nbdinfo").arg(d.uri("nope")),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
}

#[test]
fn checkpoint_overwrite_restore_and_clone_compare() {
    let (dir, d) = daemon();
    d.cli_ok(&["volume", "create", "vm", "--size", "16M"]);
    let a: Vec<u8> = (0..(16u64 << 20) / 4096)
        .flat_map(|l| block_pattern(1, l))
        .collect();
    let a_path = dir.path().join("a.raw");
    std::fs::write(&a_path, &a).unwrap();
    load(&a_path, &d.uri("vm"));
    let cp = d.cli_json(&["checkpoint", "create", "vm", "--comment", "golden"]);
    assert_eq!(cp["id"], 1);
    // Overwrite part of it and trim another part.
    qemu_io_ok(
        &d.uri("vm"),
        &["write -P 0x5a 1M 3M", "discard 8M 2M", "flush"],
    );
    let b = dump(&d.uri("vm"), dir.path());
    assert_ne!(a, b);
    let st = d.cli_json(&["volume", "stat", "vm"]);
    assert_eq!(st["checkpoint_only_bytes"], 5 << 20, "{st}");
    // Restore: the checkpointed content is back, byte for byte.
    let r = d.cli_json(&["checkpoint", "restore", "vm", "v1"]);
    assert_eq!(r["previous_head"]["id"], 2);
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        a_path.to_str().unwrap(),
        &d.uri("vm"),
    ]);
    assert!(cmp.status.success(), "{}", text(&cmp.stdout));
    // Undo the restore: back to the overwritten content.
    d.cli_ok(&["checkpoint", "restore", "vm", "v2"]);
    assert_eq!(dump(&d.uri("vm"), dir.path()), b);
    // A clone of v1 is independent of the source.
    d.cli_ok(&["volume", "clone", "vm@v1", "fork"]);
    qemu_io_ok(&d.uri("fork"), &["write -P 0x11 0 64k"]);
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        a_path.to_str().unwrap(),
        &d.uri("fork"),
    ]);
    assert_eq!(cmp.status.code(), Some(1));
    assert_eq!(dump(&d.uri("vm"), dir.path()), b);
    qemu_io_ok(&d.uri("fork"), &["read -P 0x11 0 64k"]);
    let st = d.cli_json(&["volume", "stat", "fork"]);
    assert_eq!(st["cloned_from"], "vm@v1");
    assert_eq!(st["owned_bytes"], 64 << 10);
    // Everything survives a restart.
    let mut d = d;
    d.stop();
    d.restart();
    assert_eq!(dump(&d.uri("vm"), dir.path()), b);
    let list = d.cli_json(&["checkpoint", "list", "vm"]);
    let ids: Vec<u64> = list["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2, 3]);
}

#[test]
fn trim_lowers_held_and_local_bytes() {
    let (_dir, d) = daemon();
    d.cli_ok(&["volume", "create", "t", "--size", "64M"]);
    qemu_io_ok(&d.uri("t"), &["write -P 0x33 0 16M", "flush"]);
    let st = d.cli_json(&["volume", "stat", "t"]);
    assert_eq!(st["head_bytes"], 16 << 20);
    let before = d.cli_json(&["status"])["local_bytes"].as_u64().unwrap();
    assert!(before >= 16 << 20);
    qemu_io_ok(&d.uri("t"), &["discard 0 12M", "flush"]);
    let st = d.cli_json(&["volume", "stat", "t"]);
    assert_eq!(st["head_bytes"], 4 << 20);
    assert_eq!(st["owned_bytes"], 4 << 20);
    // Space comes back on disk once the background reclaimer ran (within a few seconds).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let now = d.cli_json(&["status"])["local_bytes"].as_u64().unwrap();
        if now <= before - (11 << 20) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "local bytes stayed at {now} (before {before})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    qemu_io_ok(&d.uri("t"), &["read -P 0 0 12M", "read -P 0x33 12M 4M"]);
}

#[test]
fn multi_conn_clients_see_each_others_writes() {
    let (_dir, d) = daemon();
    d.cli_ok(&["volume", "create", "mc", "--size", "16M"]);
    let uri = d.uri("mc");
    let writers: Vec<_> = (0..4u32)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let off = format!("{}M", i * 2);
                let pat = format!("write -P {} {off} 2M", i + 1);
                qemu_io_ok(&uri, &[pat.as_str(), "flush"]);
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    for i in 0..4u32 {
        let cmd = format!("read -P {} {}M 2M", i + 1, i * 2);
        qemu_io_ok(&uri, &[cmd.as_str()]);
    }
}
