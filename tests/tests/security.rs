//! blockd's share of isolation (docs/reliability.md, "Security"): what it creates on disk
//! and which sockets it opens. Checked on the real daemon with every path moved outside
//! the data directory (a custom vhost directory, NBD socket and `file://` object store),
//! where a permissive mode would expose volume data to other users:
//!
//! - every file, directory and socket it creates is accessible by its own user only (no
//!   group or other permission bits), the sockets 0600, the data directory 0700;
//! - it listens on no TCP port unless told to (NBD over TCP is off by default; metrics
//!   are disabled here), and `--nbd-tcp` opens exactly that port;
//! - NBD requests above the 32 MiB limit are refused with EINVAL and the connection
//!   stays usable.

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use tests::nbd::{CMD_WRITE, Client, EINVAL, stamped_block};
use tests::{Daemon, free_port};

/// Every entry under `root` (itself included): path, mode, kind.
fn walk(root: &Path, out: &mut Vec<(String, u32, &'static str)>) {
    let meta = std::fs::symlink_metadata(root).unwrap();
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_socket() {
        "socket"
    } else {
        "file"
    };
    out.push((
        root.display().to_string(),
        meta.permissions().mode() & 0o7777,
        kind,
    ));
    if ft.is_dir() {
        for e in std::fs::read_dir(root).unwrap() {
            walk(&e.unwrap().path(), out);
        }
    }
}

/// Local addresses of the TCP sockets process `pid` listens on.
fn tcp_listeners(pid: u32) -> Vec<String> {
    let mut inodes = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        if let Ok(link) = std::fs::read_link(fd.unwrap().path()) {
            let l = link.display().to_string();
            if let Some(ino) = l.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                inodes.push(ino.to_string());
            }
        }
    }
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, state (0A = LISTEN), ..., inode at index 9
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                out.push(f[1].to_string());
            }
        }
    }
    out
}

#[test]
fn files_and_sockets_are_private_and_no_tcp_port_is_open_by_default() {
    let dir = tempfile::tempdir().unwrap();
    // A world-readable parent, as /run or /srv would be.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data_dir = dir.path().join("blockd");
    let vhost_dir = dir.path().join("vhost");
    let objects = dir.path().join("objects");
    let nbd_sock = dir.path().join("nbd.sock");
    let cfg = format!(
        "[nbd]\nsocket = \"{}\"\n[vhost]\ndir = \"{}\"\n[object_store]\nurl = \"file://{}\"\n",
        nbd_sock.display(),
        vhost_dir.display(),
        objects.display()
    );
    let mut d = Daemon::start_config(&data_dir, &cfg, &[]);
    d.cli_ok(&["volume", "create", "v", "--size", "16M"]);
    let mut c = Client::connect(&nbd_sock, "v").unwrap();
    let mut buf = Vec::new();
    for lba in 0..300 {
        buf.extend_from_slice(&stamped_block(lba, 9));
    }
    c.write(0, &buf, true).unwrap();

    // Oversized requests: refused, the stream stays in sync, the connection usable.
    let big = 32 * 1024 * 1024 + 4096;
    let h = c
        .send(CMD_WRITE, 0, 0, big as u32, &vec![0xee; big])
        .unwrap();
    let r = c.recv().unwrap();
    assert_eq!((r.handle, r.result.err()), (h, Some(EINVAL)));
    let h = c.send(tests::nbd::CMD_READ, 0, 0, big as u32, &[]).unwrap();
    let r = c.recv().unwrap();
    assert_eq!((r.handle, r.result.err()), (h, Some(EINVAL)));
    assert_eq!(c.read(0, 4096).unwrap(), stamped_block(0, 9));
    c.disconnect();

    d.cli_ok(&["checkpoint", "create", "v"]);
    d.cli_ok(&["volume", "clone", "v@v1", "w"]);
    d.cli_ok(&["volume", "sync", "v"]);

    let mut entries = Vec::new();
    for root in [&data_dir, &vhost_dir, &objects] {
        walk(root, &mut entries);
    }
    entries.push({
        let m = std::fs::metadata(&nbd_sock).unwrap();
        (
            nbd_sock.display().to_string(),
            m.permissions().mode() & 0o7777,
            "socket",
        )
    });
    let sockets = entries.iter().filter(|e| e.2 == "socket").count();
    // admin, nbd, and one vhost-user socket per volume.
    assert!(
        sockets >= 4,
        "expected the admin, NBD and vhost sockets: {entries:?}"
    );
    assert!(
        entries.iter().any(|e| e.0.contains("/objects/chunks/")),
        "no chunk object was written"
    );
    let bad: Vec<_> = entries
        .iter()
        .filter(|(_, mode, kind)| mode & 0o077 != 0 || (*kind == "socket" && *mode != 0o600))
        .collect();
    assert!(
        bad.is_empty(),
        "created with group/other access (or a socket not 0600): {bad:#?}"
    );
    let data_mode = std::fs::metadata(&data_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(data_mode, 0o700, "data directory mode");
    eprintln!("{} entries checked, {sockets} sockets", entries.len());

    // No TCP listener by default (metrics are disabled by the harness).
    assert_eq!(tcp_listeners(d.pid()), Vec::<String>::new());
    d.stop();

    // --nbd-tcp opens exactly that port.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut d = Daemon::start_with(&dir.path().join("blockd2"), &[], &["--nbd-tcp", &addr]);
    let listeners = tcp_listeners(d.pid());
    assert_eq!(
        listeners,
        vec![format!("0100007F:{port:04X}")],
        "listeners with --nbd-tcp {addr}"
    );
    d.stop();
}
