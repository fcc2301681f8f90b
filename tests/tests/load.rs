//! Load on one daemon (docs/reliability.md, "Load"): 1000 volumes and 200 concurrent NBD
//! clients, each writing and reading back its share of the volumes with pipelined
//! requests, against a daemon whose NBD listener serves at most 64 connections at once.
//! Checks correctness only (every volume holds exactly what was written to it, after a
//! restart too; the open-connection gauge never exceeds the cap; every client got served);
//! the memory figures it prints (RSS per volume and per GiB written) go to the docs.
//!
//! `LOAD_VOLUMES` (default 1000), `LOAD_CLIENTS` (200) and `LOAD_KIB` per volume (256).

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tests::nbd::{CMD_FLAG_FUA, CMD_WRITE, Client, block_stamp, stamped_block};
use tests::{Daemon, free_port, http_get, metric_sum};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kib * 1024
}

const MAX_CONNECTIONS: u64 = 64;

/// Writes `blocks` stamped blocks to volume `i` in 64 KiB requests, 8 in flight, the last
/// with FUA, then reads them back.
fn write_and_check(socket: &std::path::Path, i: u64, blocks: u64) -> Result<(), String> {
    let name = format!("vol{i:04}");
    let mut c = Client::connect(socket, &name).map_err(|e| format!("{name}: {e}"))?;
    let per_req = 16u64;
    let mut in_flight = 0;
    let mut first = 0;
    while first < blocks {
        let n = per_req.min(blocks - first);
        let mut buf = Vec::with_capacity(n as usize * 4096);
        for lba in first..first + n {
            buf.extend_from_slice(&stamped_block(lba, i + 1));
        }
        let fua = if first + n == blocks { CMD_FLAG_FUA } else { 0 };
        c.send(CMD_WRITE, fua, first * 4096, buf.len() as u32, &buf)
            .map_err(|e| format!("{name}: send: {e}"))?;
        in_flight += 1;
        first += n;
        if in_flight == 8 || first == blocks {
            for _ in 0..in_flight {
                let r = c.recv().map_err(|e| format!("{name}: recv: {e}"))?;
                r.result.map_err(|e| format!("{name}: write errno {e}"))?;
            }
            in_flight = 0;
        }
    }
    check(&mut c, &name, i, blocks)?;
    c.disconnect();
    Ok(())
}

fn check(c: &mut Client, name: &str, i: u64, blocks: u64) -> Result<(), String> {
    let data = c
        .read(0, (blocks * 4096) as u32)
        .map_err(|e| format!("{name}: read: {e}"))?;
    for (lba, b) in data.chunks(4096).enumerate() {
        let got = block_stamp(lba as u64, b).map_err(|e| format!("{name} block {lba} {e}"))?;
        if got != i + 1 {
            return Err(format!(
                "{name} block {lba}: stamp {got}, expected {}",
                i + 1
            ));
        }
    }
    Ok(())
}

#[test]
fn a_thousand_volumes_and_many_concurrent_clients() {
    let volumes = env("LOAD_VOLUMES", 1000);
    let clients = env("LOAD_CLIENTS", 200);
    let blocks = env("LOAD_KIB", 256) / 4;
    assert!(blocks * 4096 <= 32 << 20);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let cfg = format!("[nbd]\nmax_connections = {MAX_CONNECTIONS}\n");
    let mut d = Daemon::start_config(
        &dir.path().join("blockd"),
        &cfg,
        &["--metrics-addr", &metrics],
    );
    let rss_start = rss_bytes(d.pid());

    // 1000 volumes, created by 4 CLI workers.
    let t0 = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        for _ in 0..4 {
            let next = next.clone();
            let d = &d;
            s.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= volumes {
                        break;
                    }
                    d.cli_ok(&["volume", "create", &format!("vol{i:04}"), "--size", "64M"]);
                }
            });
        }
    });
    let created_in = t0.elapsed();
    let rss_volumes = rss_bytes(d.pid());
    let listed = d.cli_json(&["volume", "list"]);
    assert_eq!(listed["volumes"].as_array().unwrap().len() as u64, volumes);

    // Many clients at once; the main thread samples the open-connection gauge and RSS.
    let t1 = Instant::now();
    let socket = d.nbd_socket();
    let done = Arc::new(AtomicBool::new(false));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let (mut max_open, mut rss_peak, mut samples) = (0f64, 0u64, 0);
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for t in 0..clients {
            let socket = socket.clone();
            let errors = errors.clone();
            handles.push(s.spawn(move || {
                let mut i = t;
                while i < volumes {
                    if let Err(e) = write_and_check(&socket, i, blocks) {
                        errors.lock().unwrap().push(e);
                    }
                    i += clients;
                }
            }));
        }
        let done2 = done.clone();
        s.spawn(move || {
            for h in handles {
                h.join().unwrap();
            }
            done2.store(true, Ordering::SeqCst);
        });
        while !done.load(Ordering::SeqCst) {
            if let Some(body) = http_get(port, "/metrics") {
                max_open = max_open.max(metric_sum(&body, "blockd_nbd_connections"));
                samples += 1;
            }
            rss_peak = rss_peak.max(rss_bytes(d.pid()));
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let io_in = t1.elapsed();
    let errors = errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "{} clients failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(
        max_open <= MAX_CONNECTIONS as f64,
        "{max_open} NBD connections open at once, above nbd.max_connections = {MAX_CONNECTIONS}"
    );
    assert!(samples > 0, "the metrics endpoint never answered");
    let rss_written = rss_bytes(d.pid());
    let written = volumes * blocks * 4096;

    // After a restart every volume still holds its data.
    d.stop();
    d.restart_with(&[]);
    let t2 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..8 {
            let socket = d.nbd_socket();
            s.spawn(move || {
                let mut i = t;
                while i < volumes {
                    let name = format!("vol{i:04}");
                    let mut c = Client::connect(&socket, &name).unwrap();
                    check(&mut c, &name, i, blocks)
                        .unwrap_or_else(|e| panic!("after restart: {e}"));
                    c.disconnect();
                    i += 8;
                }
            });
        }
    });
    let rss_restarted = rss_bytes(d.pid());
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "load: {volumes} volumes created in {created_in:?}; {clients} clients wrote and verified {:.0} MiB in {io_in:?} (at most {max_open} connections open, cap {MAX_CONNECTIONS}); re-verified after restart in {:?}\n\
         RSS: start {:.1} MiB, with {volumes} volumes {:.1} MiB ({:.1} KiB per volume), peak during I/O {:.1} MiB, after writing {:.1} MiB ({:.1} MiB per GiB written), after restart {:.1} MiB",
        mib(written),
        t2.elapsed(),
        mib(rss_start),
        mib(rss_volumes),
        (rss_volumes.saturating_sub(rss_start)) as f64 / 1024.0 / volumes as f64,
        mib(rss_peak),
        mib(rss_written),
        mib(rss_written.saturating_sub(rss_volumes)) / (written as f64 / (1u64 << 30) as f64),
        mib(rss_restarted),
    );
    d.stop();
}
