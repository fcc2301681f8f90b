//! Crash safety of `blockd serve` as a process: SIGKILL at random moments under a write
//! load, and an abort at every named failpoint around the commit steps. After each
//! restart: every write acknowledged as durable (FUA, or followed by an acknowledged
//! flush) is there, every other 4 KiB block holds its old or its new content (never torn,
//! never another block's), and the metadata opens and keeps working.

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use rand::Rng;
use std::time::Duration;
use tests::{Daemon, dump, qemu_io, qemu_io_ok, text};

const VOL: u64 = 32 << 20;
const BLOCKS: usize = (VOL / 4096) as usize;

/// Checks that each block of `data` is one uniform byte equal to `expect[b]`, or, for the
/// blocks in `maybe`, to the in-flight write's byte.
fn check_blocks(data: &[u8], expect: &[u8], maybe: Option<(usize, usize, u8)>) -> Vec<u8> {
    let mut seen = Vec::with_capacity(BLOCKS);
    for (b, block) in data.chunks(4096).enumerate() {
        let first = block[0];
        assert!(
            block.iter().all(|x| *x == first),
            "block {b} is torn or mixed (first byte {first:#x})"
        );
        let ok =
            first == expect[b] || maybe.is_some_and(|(s, e, p)| (s..e).contains(&b) && first == p);
        assert!(
            ok,
            "block {b}: found {first:#x}, expected {:#x} (in flight: {maybe:?})",
            expect[b]
        );
        seen.push(first);
    }
    seen
}

#[test]
fn kill9_under_fua_writes_keeps_every_acknowledged_write() {
    let cycles: usize = std::env::var("CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&dir.path().join("blockd"));
    d.cli_ok(&["volume", "create", "c", "--size", "32M"]);
    let mut model = vec![0u8; BLOCKS];
    let mut rng = rand::rng();
    for cycle in 0..cycles {
        // A sequence of FUA writes; qemu-io runs them one at a time. Far more than fit in
        // the time before the kill, so it always lands mid-stream.
        let writes: Vec<(usize, usize, u8)> = (0..4000)
            .map(|i| {
                let start = rng.random_range(0..BLOCKS - 64);
                let len = rng.random_range(1..=64);
                let pat = ((cycle * 4000 + i) % 254 + 1) as u8;
                (start, start + len, pat)
            })
            .collect();
        let cmds: Vec<String> = writes
            .iter()
            .map(|(s, e, p)| format!("write -f -P {p} {} {}", s * 4096, (e - s) * 4096))
            .collect();
        let uri = d.uri("c");
        let load = std::thread::spawn(move || {
            let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
            qemu_io(&uri, &refs)
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(100..900)));
        d.kill9();
        let out = load.join().unwrap();
        let acked = text(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("wrote "))
            .count();
        assert!(
            acked < writes.len(),
            "the kill came too late to test anything (cycle {cycle})"
        );
        for (s, e, p) in &writes[..acked] {
            model[*s..*e].fill(*p);
        }
        let in_flight = writes.get(acked).copied();
        d.restart();
        let data = dump(&d.uri("c"), dir.path());
        model = check_blocks(&data, &model, in_flight);
        eprintln!("cycle {cycle}: {acked} acknowledged writes verified after kill -9");
    }
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Writes,
    Flush,
    Checkpoint,
    Restore,
    Clone,
    DeleteCheckpoint,
    DeleteTimeline,
    Discard,
    CreateVolume,
    DeleteVolume,
    Relocate,
}

/// Failpoints around every commit step, and the operation that reaches each.
const SCENARIOS: &[(&str, Step)] = &[
    ("chunkstore::append::after_write", Step::Writes),
    ("snapshotter::commit::before_write", Step::Writes),
    ("snapshotter::commit::after_write", Step::Writes),
    ("chunkstore::sync", Step::Flush),
    ("snapshotter::sync", Step::Flush),
    ("snapshotter::create_checkpoint", Step::Checkpoint),
    ("snapshotter::restore", Step::Restore),
    ("snapshotter::clone", Step::Clone),
    ("snapshotter::delete_checkpoint", Step::DeleteCheckpoint),
    ("snapshotter::gc::before_write", Step::DeleteCheckpoint),
    ("snapshotter::delete_timeline", Step::DeleteTimeline),
    ("chunkstore::punch", Step::Discard),
    ("snapshotter::create_volume", Step::CreateVolume),
    ("snapshotter::delete_volume", Step::DeleteVolume),
    ("snapshotter::relocate::before_write", Step::Relocate),
];

#[test]
fn abort_at_every_failpoint_recovers() {
    for (fp, step) in SCENARIOS {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Daemon::start(&dir.path().join("blockd"));
        d.cli_ok(&["volume", "create", "v", "--size", "8M"]);
        // Generation A, flushed and checkpointed: must survive anything below.
        qemu_io_ok(&d.uri("v"), &["write -P 0x0a 0 4M", "flush"]);
        d.cli_ok(&["checkpoint", "create", "v"]);
        if matches!(step, Step::DeleteCheckpoint | Step::Discard) {
            // Generation B over half of it, so the checkpoint holds blocks of its own.
            qemu_io_ok(&d.uri("v"), &["write -P 0x0b 0 2M", "flush"]);
        }
        if matches!(step, Step::DeleteTimeline) {
            // Two restores: v3 (the head before the second) is then the only thing that
            // keeps the middle timeline alive.
            d.cli_ok(&["checkpoint", "restore", "v", "v1"]);
            d.cli_ok(&["checkpoint", "restore", "v", "v1"]);
        }
        if matches!(step, Step::Relocate) {
            // 4M..5M written, then every other block overwritten one request at a time:
            // fragmented, flushed; a 1 MiB read of it relocates it.
            let mut cmds = vec!["write -P 0x0c 4M 1M".to_string()];
            cmds.extend(
                (0..256)
                    .step_by(2)
                    .map(|b| format!("write -P 0x0c {} 4k", (4 << 20) + b * 4096)),
            );
            cmds.push("flush".into());
            let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
            qemu_io_ok(&d.uri("v"), &refs);
        }
        d.stop();
        let fps = format!("{fp}=panic");
        d.restart_with(&[("FAILPOINTS", fps.as_str())]);
        let uri = d.uri("v");
        // Reach the failpoint.
        match step {
            Step::Writes => {
                qemu_io(&uri, &["write -f -P 0x0c 4M 1M", "write -f -P 0x0c 5M 1M"]);
            }
            Step::Flush => {
                qemu_io(&uri, &["write -P 0x0c 4M 1M", "flush"]);
            }
            Step::Checkpoint => {
                d.cli(&["checkpoint", "create", "v"]);
            }
            Step::Restore => {
                qemu_io(&uri, &["write -f -P 0x0c 4M 1M"]);
                d.cli(&["checkpoint", "restore", "v", "v1"]);
            }
            Step::Clone => {
                d.cli(&["volume", "clone", "v@v1", "c"]);
            }
            Step::DeleteCheckpoint => {
                d.cli(&["checkpoint", "delete", "v", "v1"]);
            }
            Step::DeleteTimeline => {
                d.cli(&["checkpoint", "delete", "v", "v3"]);
            }
            Step::Discard => {
                qemu_io(&uri, &["discard 0 2M", "flush"]);
            }
            Step::CreateVolume => {
                d.cli(&["volume", "create", "w", "--size", "8M"]);
            }
            Step::DeleteVolume => {
                d.cli(&["volume", "delete", "v"]);
            }
            Step::Relocate => {
                qemu_io(&uri, &["read -P 0x0c 4M 1M"]);
            }
        }
        let status = d.wait_exit(Duration::from_secs(20));
        assert!(
            !status.success(),
            "{fp}: daemon should have aborted, got {status}"
        );
        d.restart();

        // Metadata opens; the volume (unless its delete was the interrupted step and
        // committed first) reads back consistently.
        let vols = d.cli_json(&["volume", "list"]);
        let names: Vec<String> = vols["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect();
        if !names.contains(&"v".to_string()) {
            assert!(matches!(step, Step::DeleteVolume), "{fp}: volume v lost");
            continue;
        }
        let data = dump(&d.uri("v"), dir.path());
        for (b, block) in data.chunks(4096).enumerate() {
            let first = block[0];
            assert!(block.iter().all(|x| *x == first), "{fp}: block {b} torn");
            let allowed: &[u8] = match (step, b * 4096) {
                (Step::Writes | Step::Flush | Step::Restore, o)
                    if (4 << 20..6 << 20).contains(&o) =>
                {
                    &[0, 0x0c]
                }
                (Step::Relocate, o) if (4 << 20..5 << 20).contains(&o) => &[0x0c],
                (Step::DeleteCheckpoint, o) if o < 2 << 20 => &[0x0b],
                (Step::Discard, o) if o < 2 << 20 => &[0, 0x0b],
                (_, o) if o < 4 << 20 => &[0x0a],
                _ => &[0],
            };
            assert!(
                allowed.contains(&first),
                "{fp}: block {b} = {first:#x}, allowed {allowed:?}"
            );
        }
        // The checkpoint (unless its deletion committed) still shows generation A.
        let cps = d.cli_json(&["checkpoint", "list", "v"]);
        if cps["checkpoints"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == 1)
        {
            let name = format!("verify{}", rand::random::<u16>());
            d.cli_ok(&["volume", "clone", "v@v1", &name]);
            qemu_io_ok(&d.uri(&name), &["read -P 0x0a 0 4M", "read -P 0 4M 4M"]);
        } else {
            assert!(
                matches!(step, Step::DeleteCheckpoint),
                "{fp}: checkpoint v1 lost"
            );
        }
        // And the daemon keeps working: write, checkpoint, restore.
        qemu_io_ok(&d.uri("v"), &["write -P 0x0d 7M 1M", "flush"]);
        let cp = d.cli_json(&["checkpoint", "create", "v"]);
        let id = format!("v{}", cp["id"]);
        qemu_io_ok(&d.uri("v"), &["write -P 0x0e 7M 1M"]);
        d.cli_ok(&["checkpoint", "restore", "v", &id]);
        qemu_io_ok(&d.uri("v"), &["read -P 0x0d 7M 1M"]);
        d.stop();
        eprintln!("{fp}: recovered");
    }
}
