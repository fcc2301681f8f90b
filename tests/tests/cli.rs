//! The operator CLI against a running daemon: outputs, errors and exit codes.

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use std::process::Command;
use std::time::Duration;
use tests::{Daemon, bin_path, qemu_io_ok, run, text};

fn code(out: &std::process::Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

#[test]
fn errors_have_clear_messages_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("blockd"));
    d.cli_ok(&["volume", "create", "a", "--size", "8M"]);

    let dup = d.cli(&["volume", "create", "a", "--size", "8M"]);
    assert_eq!(code(&dup), 4);
    assert!(
        text(&dup.stderr).contains("already exists"),
        "{}",
        text(&dup.stderr)
    );

    let bad_size = d.cli(&["volume", "create", "b", "--size", "ten"]);
    assert_eq!(code(&bad_size), 2, "usage error");
    assert!(text(&bad_size.stderr).contains("invalid size"));

    let unaligned = d.cli(&["volume", "create", "b", "--size", "1000"]);
    assert_eq!(code(&unaligned), 6);
    assert!(text(&unaligned.stderr).contains("multiple of 4096"));

    let bad_name = d.cli(&["volume", "create", "../x", "--size", "8M"]);
    assert_eq!(code(&bad_name), 6);

    let missing = d.cli(&["volume", "stat", "nope"]);
    assert_eq!(code(&missing), 3);
    assert!(text(&missing.stderr).contains("not found"));

    let missing_cp = d.cli(&["checkpoint", "restore", "a", "v9"]);
    assert_eq!(code(&missing_cp), 3);
    assert!(text(&missing_cp.stderr).contains("v9"));

    let bad_cp = d.cli(&["checkpoint", "delete", "a", "latest"]);
    assert_eq!(code(&bad_cp), 6);

    let bad_clone = d.cli(&["volume", "clone", "a", "b"]);
    assert_eq!(code(&bad_clone), 6);
    assert!(text(&bad_clone.stderr).contains("NAME@CHECKPOINT"));

    // JSON errors on stdout with the same codes.
    let j = d.cli(&["volume", "stat", "nope", "--json"]);
    assert_eq!(code(&j), 3);
    let v: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
    assert_eq!(v["error"]["code"], "not_found");

    // No daemon behind the socket.
    let out = run(
        Command::new(bin_path("blockd")).args([
            "--admin-socket",
            "/nonexistent/admin.sock",
            "volume",
            "list",
        ]),
        Duration::from_secs(10),
    );
    assert_eq!(code(&out), 7);
    assert!(text(&out.stderr).contains("cannot reach blockd"));
}

#[test]
fn listing_stat_and_checkpoint_ids() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("blockd"));
    d.cli_ok(&["volume", "create", "web", "--size", "1G"]);
    d.cli_ok(&["volume", "create", "db", "--size", "512M"]);
    let human = d.cli_ok(&["volume", "list"]);
    assert!(human.starts_with("NAME"), "{human}");
    assert!(human.contains("web") && human.contains("1 GiB"), "{human}");
    let list = d.cli_json(&["volume", "list"]);
    let names: Vec<&str> = list["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["db", "web"]);

    for i in 1..=3 {
        let cp = d.cli_json(&["checkpoint", "create", "web", "--comment", &format!("n{i}")]);
        assert_eq!(cp["id"], i);
        assert_eq!(cp["comment"], format!("n{i}"));
        assert!(cp["duration_us"].as_u64().is_some());
    }
    d.cli_ok(&["checkpoint", "delete", "web", "v2"]);
    let cp = d.cli_json(&["checkpoint", "create", "web"]);
    assert_eq!(cp["id"], 4, "ids are never reused");
    let human = d.cli_ok(&["checkpoint", "list", "web"]);
    assert!(
        human.contains("v1") && human.contains("v3") && !human.contains("v2 "),
        "{human}"
    );
    let show = d.cli_json(&["checkpoint", "show", "web", "v3"]);
    assert_eq!(show["comment"], "n3");

    let st = d.cli_json(&["volume", "stat", "web"]);
    assert_eq!(st["size_bytes"], 1u64 << 30);
    assert_eq!(st["checkpoints"], 3);
    let human = d.cli_ok(&["volume", "stat", "web"]);
    assert!(human.contains("checkpoint-only"), "{human}");
    d.cli_ok(&["volume", "delete", "db"]);
    assert_eq!(code(&d.cli(&["volume", "stat", "db"])), 3);
}

#[test]
fn restore_and_delete_refuse_attached_volumes_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("blockd"));
    d.cli_ok(&["volume", "create", "busy", "--size", "8M"]);
    qemu_io_ok(&d.uri("busy"), &["write -P 7 0 1M"]);
    d.cli_ok(&["checkpoint", "create", "busy"]);
    qemu_io_ok(&d.uri("busy"), &["write -P 8 0 1M"]);
    // A client that stays connected for a while.
    let uri = d.uri("busy");
    let holder =
        std::thread::spawn(move || tests::qemu_io(&uri, &["sleep 4000", "read -P 8 0 4k"]));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while d.cli_json(&["volume", "stat", "busy"])["attached_clients"] != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "client never attached"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = d.cli(&["checkpoint", "restore", "busy", "v1"]);
    assert_eq!(code(&r), 5);
    assert!(text(&r.stderr).contains("--force"), "{}", text(&r.stderr));
    let r = d.cli(&["volume", "delete", "busy"]);
    assert_eq!(code(&r), 5);
    // Forced: the client is disconnected, then the restore happens.
    d.cli_ok(&["checkpoint", "restore", "busy", "v1", "--force"]);
    let held = holder.join().unwrap();
    let all = format!("{}{}", text(&held.stdout), text(&held.stderr));
    assert!(
        all.contains("failed") || all.contains("error") || all.contains("Error"),
        "the forced-off client's read must fail: {all}"
    );
    qemu_io_ok(&d.uri("busy"), &["read -P 7 0 1M"]);
    assert_eq!(
        d.cli_json(&["volume", "stat", "busy"])["attached_clients"],
        0
    );
}
