//! The Prometheus endpoint of a running daemon: every metric `docs/metrics.md` documents is
//! exported, and the object-store and billing metrics move when data is written and synced
//! (the default object store is the local directory `<data_dir>/objects`).

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use tests::{Daemon, qemu_io_ok};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of the first sample whose name and labels start with `prefix`.
fn value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no sample {prefix} in:\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// blockd's metric names in the tables of docs/metrics.md (first column), split at " / ".
/// (The API server's `sprites_*` metrics are checked by tests/tests/api.rs.)
fn documented() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
        .unwrap();
    let mut names = Vec::new();
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let cell = line.split('|').nth(1).unwrap();
        for part in cell.split(" / ") {
            let name = part.trim().trim_matches('`');
            if name.starts_with("blockd_") {
                names.push(name.to_string());
            }
        }
    }
    names
}

#[test]
fn metrics_cover_the_docs_and_follow_uploads_and_billing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&dir.path().join("data"), &[], &["--metrics-addr", &addr]);
    d.cli_ok(&["volume", "create", "m", "--size", "64M"]);
    // 16 MiB of data that compresses, then a read.
    qemu_io_ok(
        &d.uri("m"),
        &["write -P 7 0 16M", "flush", "read -P 7 0 16M"],
    );
    d.cli_ok(&["volume", "sync", "m"]);

    let text = scrape(port);
    // Families labelled by error kind have no sample until the first error.
    let appears_later = ["blockd_request_errors_total"];
    let missing: Vec<String> = documented()
        .into_iter()
        .filter(|n| !appears_later.contains(&n.as_str()))
        .filter(|n| !text.lines().any(|l| l.starts_with(n.as_str())))
        .collect();
    assert!(
        missing.is_empty(),
        "documented metrics missing from /metrics: {missing:?}\n{text}"
    );

    assert!(value(&text, "chunkstore_object_requests_total{op=\"put\"}") >= 2.0);
    assert!(value(&text, "chunkstore_object_bytes_total{direction=\"out\"}") > 0.0);
    assert!(value(&text, "chunkstore_uploaded_chunks_total") >= 1.0);
    assert!(value(&text, "chunkstore_object_request_seconds_count{op=\"put\"}") >= 2.0);
    let stored = value(&text, "blockd_volume_stored_bytes{volume=\"m\"}");
    assert!(stored > 0.0, "stored bytes after sync");
    assert!(
        stored < (16 << 20) as f64 / 4.0,
        "a constant pattern compresses: {stored} stored bytes for 16 MiB"
    );
    assert_eq!(
        value(&text, "blockd_volume_stored_head_bytes{volume=\"m\"}"),
        stored,
        "no checkpoints: all stored bytes belong to the head"
    );
    // Nothing waits for upload after a sync (the gauge follows within a background round).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while value(&scrape(port), "chunkstore_upload_lag_seconds") != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "upload lag stays above 0 after a sync"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The JSON stat agrees with the metrics.
    let stat = d.cli_json(&["volume", "stat", "m"]);
    assert_eq!(stat["stored_bytes"].as_f64().unwrap(), stored);
}
