//! Real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy) against the in-process server.
//!
//! The server runs on a multi-threaded runtime while the client runs as a child process. A
//! test is skipped (with a message) only when its tool is not installed.

#![allow(clippy::unwrap_used)]

#[path = "nbd_support.rs"]
mod support;

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use support::{MIB, TestDevice, TestExports, TestServer, pattern};
use vhost_blk::BlockDevice;

fn have(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        eprintln!("SKIPPED: `{tool}` is not installed");
    }
    found
}

async fn run(tool: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(tool);
    cmd.args(args).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{tool} {args:?} timed out"))
        .unwrap_or_else(|e| panic!("{tool} {args:?}: {e}"));
    eprintln!(
        "$ {tool} {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a tool that must succeed; returns its stdout.
async fn ok(tool: &str, args: &[&str]) -> String {
    let out = run(tool, args).await;
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {:?}",
        out.status
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs qemu-io commands; every command must succeed (qemu-io reports pattern mismatches
/// and I/O errors on stdout/stderr and in its exit status).
async fn qemu_io(uri: &str, extra: &[&str], commands: &[&str]) -> String {
    let mut args: Vec<&str> = vec!["-f", "raw"];
    args.extend_from_slice(extra);
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let out = run("qemu-io", &args).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-io failed: {text}");
    for bad in ["failed", "error", "Error"] {
        assert!(!text.contains(bad), "qemu-io reported {bad:?}: {text}");
    }
    text
}

fn exports() -> TestExports {
    let e = TestExports::default();
    e.add("disk", TestDevice::new("disk", 16 * MIB));
    e.add("ro", TestDevice::read_only("ro", MIB));
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_read_write_discard_zero_flush() {
    if !have("qemu-io") {
        return;
    }
    let srv = TestServer::start(exports()).await;
    let dev = srv.exports.device("disk");
    let uri = srv.uri("disk");
    qemu_io(
        &uri,
        &[],
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "discard 0 4k",
            "read -P 0 0 4k",
            "write -z 8k 4k",
            "read -P 0 8k 4k",
            "read -P 0xab 4k 4k",
            "read -P 0xab 12k 52k",
            "write -f -P 0xcd 1M 128k",
            "read -P 0xcd 1M 128k",
            "flush",
        ],
    )
    .await;
    let snap = dev.mem.snapshot();
    assert!(snap[..4096].iter().all(|b| *b == 0));
    assert!(snap[4096..8192].iter().all(|b| *b == 0xab));
    assert!(snap[8192..12288].iter().all(|b| *b == 0));
    assert!(snap[12288..65536].iter().all(|b| *b == 0xab));
    assert!(snap[MIB..MIB + 131072].iter().all(|b| *b == 0xcd));
    assert!(dev.flushes.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let s = srv.server.stats().snapshot();
    assert!(s.requests.trim >= 1 && s.requests.write_zeroes >= 1 && s.requests.flush >= 1);
    assert_eq!(s.request_errors, 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_concurrent_aio() {
    if !have("qemu-io") {
        return;
    }
    let srv = TestServer::start(exports()).await;
    let uri = srv.uri("disk");
    let mut cmds: Vec<String> = (0..16)
        .map(|i| format!("aio_write -P {} {}k 256k", i + 1, i * 256))
        .collect();
    cmds.push("aio_flush".into());
    cmds.extend((0..16).map(|i| format!("aio_read -P {} {}k 256k", i + 1, i * 256)));
    cmds.push("aio_flush".into());
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&uri, &[], &refs).await;
    let snap = srv.exports.device("disk").mem.snapshot();
    for i in 0..16usize {
        let r = &snap[i * 256 * 1024..(i + 1) * 256 * 1024];
        assert!(r.iter().all(|b| *b == i as u8 + 1), "region {i}");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_read_only_export() {
    if !have("qemu-io") {
        return;
    }
    let srv = TestServer::start(exports()).await;
    let uri = srv.uri("ro");
    qemu_io(&uri, &["-r"], &["read -P 0 0 64k"]).await;
    // Opening read-write, or writing, must fail and change nothing.
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 4k", uri.as_str()],
    )
    .await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "opening a read-only export read-write should fail: {text}"
    );
    let snap = srv.exports.device("ro").mem.snapshot();
    assert!(snap.iter().all(|b| *b == 0));
    srv.stop().await;
}

/// A 16 MiB raw image with data in a few places and holes elsewhere.
fn make_image(path: &Path) -> Vec<u8> {
    let mut img = vec![0u8; 16 * MIB];
    for (off, len, seed) in [
        (0usize, 64 * 1024, 1u8),
        (3 * MIB + 4096, 8192, 2),
        (7 * MIB, MIB, 3),
        (16 * MIB - 4096, 4096, 4),
    ] {
        img[off..off + len].copy_from_slice(&pattern(len, seed));
    }
    std::fs::write(path, &img).expect("write image");
    img
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_info_convert_compare() {
    if !have("qemu-img") {
        return;
    }
    let srv = TestServer::start(exports()).await;
    let uri = srv.uri("disk");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let back = dir.path().join("back.raw");
    let img = make_image(&src);
    let (src_s, back_s) = (src.to_str().unwrap(), back.to_str().unwrap());

    let info: serde_json::Value =
        serde_json::from_str(&ok("qemu-img", &["info", "--output=json", &uri]).await).unwrap();
    assert_eq!(info["virtual-size"], 16 * MIB as u64);

    // Fill the export with garbage first, so zeroing holes during convert is tested.
    {
        let dev = srv.exports.device("disk");
        dev.write(0, vec![0xff; 16 * MIB], false).await.unwrap();
    }
    // Out-of-order writes with many coroutines: lots of concurrent requests.
    ok(
        "qemu-img",
        &[
            "convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw", src_s, &uri,
        ],
    )
    .await;
    assert!(srv.exports.device("disk").mem.snapshot() == img);
    // The holes of the sparse source were zeroed, not written.
    assert!(srv.server.stats().snapshot().requests.write_zeroes >= 1);
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    )
    .await;

    ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, back_s],
    )
    .await;
    assert!(std::fs::read(&back).unwrap() == img);

    // compare notices a difference.
    {
        let dev = srv.exports.device("disk");
        dev.write(7 * MIB as u64, vec![0x42; 512], false)
            .await
            .unwrap();
    }
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "images should differ");
    assert_eq!(srv.server.stats().snapshot().request_errors, 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_json_flags() {
    if !have("nbdinfo") {
        return;
    }
    let srv = TestServer::start(exports()).await;
    let v: serde_json::Value =
        serde_json::from_str(&ok("nbdinfo", &["--json", &srv.uri("disk")]).await).unwrap();
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], true);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "disk");
    assert_eq!(e["description"], "test device disk");
    assert_eq!(e["export-size"], 16 * MIB as u64);
    assert_eq!(e["contexts"], serde_json::json!(["base:allocation"]));
    for (k, want) in [
        ("is_read_only", false),
        ("can_trim", true),
        ("can_flush", true),
        ("can_fua", true),
        ("can_multi_conn", true),
        ("can_zero", true),
        ("can_fast_zero", true),
        ("can_df", true),
        ("can_cache", false),
        ("is_rotational", false),
    ] {
        assert_eq!(e[k], want, "{k}");
    }
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 * MIB as u64);

    let v: serde_json::Value =
        serde_json::from_str(&ok("nbdinfo", &["--json", &srv.uri("ro")]).await).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_trim"], false);
    assert_eq!(e["can_zero"], false);
    assert_eq!(e["can_flush"], true);

    // --list walks every export with NBD_OPT_LIST and NBD_OPT_INFO.
    let socket = srv.socket.display().to_string();
    let v: serde_json::Value = serde_json::from_str(
        &ok(
            "nbdinfo",
            &["--list", "--json", &format!("nbd+unix:///?socket={socket}")],
        )
        .await,
    )
    .unwrap();
    let mut names: Vec<String> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["disk", "ro"]);

    // Unknown export: a clean error.
    let out = run("nbdinfo", &[&format!("nbd+unix:///nope?socket={socket}")]).await;
    assert!(!out.status.success());
    assert_eq!(srv.exports.attached(), 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_map_base_allocation() {
    if !have("nbdinfo") {
        return;
    }
    let srv = TestServer::start(exports()).await;
    let dev = srv.exports.device("disk");
    dev.write(4096, vec![1; 4096], false).await.unwrap();
    dev.write(MIB as u64, vec![2; 65536], false).await.unwrap();
    let map = ok("nbdinfo", &["--map", &srv.uri("disk")]).await;
    let rows: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    let size = 16 * MIB as u64;
    let mib = MIB as u64;
    assert_eq!(
        rows,
        vec![
            (0, 4096, 3),
            (4096, 4096, 0),
            (8192, mib - 8192, 3),
            (mib, 65536, 0),
            (mib + 65536, size - mib - 65536, 3),
        ]
    );
    assert!(srv.server.stats().snapshot().requests.block_status >= 1);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_roundtrip_multi_conn() {
    if !have("nbdcopy") {
        return;
    }
    let srv = TestServer::start(exports()).await;
    let uri = srv.uri("disk");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let back = dir.path().join("back.raw");
    let img = make_image(&src);
    {
        let dev = srv.exports.device("disk");
        dev.write(0, vec![0x5a; 16 * MIB], false).await.unwrap();
    }
    ok(
        "nbdcopy",
        &[
            "--flush",
            "--connections=4",
            "--requests=32",
            src.to_str().unwrap(),
            &uri,
        ],
    )
    .await;
    assert!(srv.exports.device("disk").mem.snapshot() == img);
    ok("nbdcopy", &[&uri, back.to_str().unwrap()]).await;
    assert!(std::fs::read(&back).unwrap() == img);
    let s = srv.server.stats().snapshot();
    assert!(s.connections_accepted >= 2);
    assert_eq!(s.request_errors, 0);
    assert!(s.requests.flush >= 1);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_at_once() {
    if !have("qemu-io") {
        return;
    }
    let srv = Arc::new(TestServer::start(exports()).await);
    let mut tasks = Vec::new();
    for i in 0..6u32 {
        let srv = srv.clone();
        tasks.push(tokio::spawn(async move {
            let uri = srv.uri("disk");
            let w = format!("write -P {} {}M 1M", i + 1, i);
            let r = format!("read -P {} {}M 1M", i + 1, i);
            qemu_io(&uri, &[], &[&w, &r, "flush"]).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let snap = srv.exports.device("disk").mem.snapshot();
    for i in 0..6usize {
        assert!(
            snap[i * MIB..(i + 1) * MIB]
                .iter()
                .all(|b| *b == i as u8 + 1)
        );
    }
    assert!(srv.server.stats().snapshot().connections_accepted >= 6);
    Arc::into_inner(srv).expect("last reference").stop().await;
}
