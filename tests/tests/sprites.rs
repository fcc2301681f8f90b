//! Sprites end to end: the real `blockd` and `sprited` binaries, QEMU (KVM if the probe boots,
//! else TCG), the base image `sprited image build` makes, driven through the `sprited` CLI and
//! the wake-on-request proxy. Serialized with the other guest tests (tests::guest_lock).

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tests::{Daemon, bin_path, text};

const TIMEOUT: Duration = Duration::from_secs(180);

struct Sprited {
    data_dir: PathBuf,
    child: Child,
    log: PathBuf,
}

impl Sprited {
    fn start(data_dir: &Path, blockd: &Daemon, extra: &[&str]) -> Sprited {
        std::fs::create_dir_all(data_dir).unwrap();
        let log = data_dir.with_extension("log");
        let accel_cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sprites-accel");
        let mut c = Command::new(bin_path("sprited"));
        c.arg("--data-dir")
            .arg(data_dir)
            .arg("serve")
            .arg("--blockd-socket")
            .arg(blockd.data_dir.join("admin.sock"))
            .args(["--proxy-addr", "127.0.0.1:0", "--idle-warm-secs", "0"])
            .args(["--agent-timeout-secs", "8", "--min-mem-available-mib", "0"])
            .arg("--accel-cache")
            .arg(&accel_cache)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Ok(a) = std::env::var("SPRITES_GUEST_ACCEL") {
            c.args(["--accel", &a]);
        }
        let child = c.spawn().unwrap();
        let s = Sprited {
            data_dir: data_dir.to_path_buf(),
            child,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut s = s;
        while !data_dir.join("sprited.sock").exists() {
            let exited = s.child.try_wait().unwrap().is_some();
            assert!(
                Instant::now() < deadline && !exited,
                "sprited did not start:\n{}",
                s.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin_path("sprited"));
        c.arg("--data-dir").arg(&self.data_dir).args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        tests::run(&mut self.cmd(args), TIMEOUT)
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "sprited {args:?} failed ({}): {}{}\n--- sprited log ---\n{}",
            o.status,
            text(&o.stdout),
            text(&o.stderr),
            self.logs()
        );
        text(&o.stdout)
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// Runs a shell line in the sprite; returns its stdout.
    fn sh(&self, sprite: &str, line: &str) -> String {
        self.ok(&["exec", sprite, "--", "sh", "-c", line])
    }

    fn state(&self, sprite: &str) -> (String, Option<String>, String) {
        let v = self.json(&["get", sprite]);
        (
            v["state"].as_str().unwrap().to_string(),
            v["pause"].as_str().map(str::to_string),
            v["reason"].as_str().unwrap_or("").to_string(),
        )
    }

    fn wait_state(&self, sprite: &str, state: &str, pause: Option<&str>, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let (s, p, r) = self.state(sprite);
            if s == state && p.as_deref() == pause {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{sprite} is {s} {p:?} ({r}), expected {state} {pause:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn proxy_url(&self) -> String {
        self.json(&["status"])["proxy_url"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

impl Drop for Sprited {
    fn drop(&mut self) {
        // SIGTERM: the daemon stops its VMs.
        tests::terminate(&mut self.child, Duration::from_secs(60));
    }
}

/// A plain HTTP/1.1 GET through the proxy with the given Host header.
fn http_get(proxy: &str, host: &str, path: &str) -> (u16, String) {
    let addr = proxy.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn sprite_lifecycle_end_to_end() {
    let _lock = tests::guest_lock(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest"));
    let dir = tempfile::tempdir().unwrap();
    let mut blockd = Daemon::start(&dir.path().join("blockd"));
    let sp = Sprited::start(&dir.path().join("vmm"), &blockd, &[]);

    // Base image, then a sprite cloned from it.
    let img = sp.json(&["image", "build", "--size-mib", "512"]);
    assert_eq!(img["checkpoint"], "v1", "{img}");
    let created = sp.json(&[
        "create",
        "s1",
        "--idle-warm-secs",
        "4",
        "--idle-cold-secs",
        "0",
    ]);
    assert_eq!(created["state"], "active", "{created}");
    assert!(created["storage"].is_null() || created["storage"].is_object());
    let v = sp.json(&["get", "s1"]);
    assert_eq!(v["storage"]["cloned_from"], "image-base@v1", "{v}");

    // exec: output, exit status, stdin, a file write.
    assert_eq!(sp.sh("s1", "echo hello"), "hello\n");
    let o = sp.run(&[
        "exec",
        "s1",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(text(&o.stdout), "out\n");
    assert!(text(&o.stderr).contains("err"));
    let mut c = sp.cmd(&[
        "exec",
        "-i",
        "s1",
        "--",
        "sh",
        "-c",
        "cat > /root/in.txt; wc -c < /root/in.txt",
    ]);
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout).trim(), "11");
    sp.sh("s1", "echo first > /root/file.txt; sync");
    // A web server that starts at every boot, serving the file.
    sp.sh(
        "s1",
        "mkdir -p /www; cp /root/file.txt /www/index.html; \
         printf '#!/bin/sh\\nhttpd -p 8080 -h /www\\n' > /etc/rc.local; chmod +x /etc/rc.local; \
         httpd -p 8080 -h /www; sync",
    );
    // A background process that must survive a warm pause.
    sp.sh(
        "s1",
        "sh -c 'echo $$ > /tmp/loop.pid; while true; do sleep 1; done' >/dev/null 2>&1 &",
    );
    std::thread::sleep(Duration::from_millis(500));
    let pid = sp.sh("s1", "cat /tmp/loop.pid").trim().to_string();
    assert!(!pid.is_empty());

    // Idle: it pauses warm by itself; an exec wakes it and the process is still there.
    sp.wait_state("s1", "hibernated", Some("warm"), Duration::from_secs(60));
    assert!(sp.state("s1").2.contains("idle"), "{:?}", sp.state("s1"));
    sp.sh("s1", &format!("kill -0 {pid}"));
    assert_eq!(sp.state("s1").0, "active");
    let u = sp.json(&["usage", "s1"]);
    assert!(u["compute"]["warm_wakes"].as_u64().unwrap() >= 1, "{u}");
    assert!(u["compute"]["cpu_seconds"].as_f64().unwrap() > 0.0, "{u}");

    // A detachable session survives its client going away; attach shows its output.
    let mut client = sp
        .cmd(&[
            "exec",
            "--detachable",
            "s1",
            "--",
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo tick $i; sleep 1; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = [0u8; 7];
    client
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    assert_eq!(&first, b"tick 1\n");
    client.kill().unwrap();
    let _ = client.wait();
    std::thread::sleep(Duration::from_secs(2));
    let sessions = sp.json(&["sessions", "s1"]);
    let sess = sessions["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["detachable"] == true && s["exit_code"].is_null())
        .unwrap_or_else(|| panic!("no running session: {sessions}"))
        .clone();
    let id = sess["id"].as_str().unwrap().to_string();
    let mut att = sp
        .cmd(&["attach", "s1", &id])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = vec![0u8; 64];
    let n = att.stdout.as_mut().unwrap().read(&mut buf).unwrap();
    assert!(
        text(&buf[..n]).starts_with("tick 1\ntick 2\n"),
        "{}",
        text(&buf[..n])
    );
    att.kill().unwrap();
    let _ = att.wait();
    sp.ok(&["kill-session", "s1", &id]);

    // Cold: the VM goes away; an HTTP request through the proxy boots it and is answered.
    sp.ok(&["hibernate", "s1", "--cold"]);
    assert_eq!(sp.state("s1").1.as_deref(), Some("cold"));
    let proxy = sp.proxy_url();
    let (status, body) = http_get(&proxy, "s1.sprites.localhost", "/");
    assert_eq!((status, body.as_str()), (200, "first\n"), "{}", sp.logs());
    assert_eq!(sp.state("s1").0, "active");
    // Processes did not survive the cold pause; files did.
    let o = sp.run(&["exec", "s1", "--", "kill", "-0", &pid]);
    assert!(!o.status.success(), "the loop survived a cold boot?");
    assert_eq!(sp.sh("s1", "cat /root/in.txt"), "from stdin\n");
    // The path form of the URL, and an unknown sprite.
    let (status, body) = http_get(&proxy, "localhost", "/s/s1/index.html");
    assert_eq!((status, body.as_str()), (200, "first\n"));
    assert_eq!(http_get(&proxy, "nope.sprites.localhost", "/").0, 404);

    // Files in and out.
    let local = dir.path().join("up.bin");
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&local, &payload).unwrap();
    sp.ok(&["put", "s1", local.to_str().unwrap(), "/root/up.bin"]);
    let back = dir.path().join("down.bin");
    sp.ok(&["fetch", "s1", "/root/up.bin", back.to_str().unwrap()]);
    assert_eq!(std::fs::read(&back).unwrap(), payload);
    assert!(sp.ok(&["ls", "s1", "/root"]).contains("up.bin"));
    let o = sp.run(&["fetch", "s1", "/root/missing"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));

    // Checkpoint a running sprite, change the file, restore, find the old content.
    let ck = sp.json(&["checkpoint", "create", "s1", "--comment", "first"]);
    let ck_id = format!("v{}", ck["id"]);
    sp.sh("s1", "echo second > /root/file.txt; sync");
    sp.ok(&["checkpoint", "restore", "s1", &ck_id]);
    assert_eq!(sp.sh("s1", "cat /root/file.txt"), "first\n");
    assert_eq!(sp.state("s1").0, "active");

    // Fork from the checkpoint: both sprites diverge.
    let f = sp.json(&["fork", "s1", &ck_id, "s2"]);
    assert_eq!(f["forked_from"], format!("s1@{ck_id}"));
    sp.sh("s2", "echo fork > /root/file.txt; sync");
    sp.sh("s1", "echo main > /root/file.txt; sync");
    assert_eq!(sp.sh("s2", "cat /root/file.txt"), "fork\n");
    assert_eq!(sp.sh("s1", "cat /root/file.txt"), "main\n");

    // Fault: kill -9 of QEMU -> error; the next request boots it with the disk intact.
    sp.ok(&["kill-vm", "s2"]);
    sp.wait_state("s2", "error", None, Duration::from_secs(30));
    assert!(sp.state("s2").2.contains("unexpectedly"));
    assert_eq!(sp.sh("s2", "cat /root/file.txt"), "fork\n");

    // Fault: blockd restarts under a running sprite; the guest's disk resumes.
    blockd.kill9();
    blockd.restart();
    assert_eq!(
        sp.sh(
            "s1",
            "echo after-restart > /root/r.txt; sync; cat /root/r.txt /root/file.txt"
        ),
        "after-restart\nmain\n"
    );

    // Fault: the runtime stops answering -> timeout -> error; the next request boots again.
    sp.sh(
        "s2",
        "sh -c 'sleep 1; kill -STOP $(cat /run/sprite-agent.pid)' >/dev/null 2>&1 &",
    );
    std::thread::sleep(Duration::from_secs(2));
    let o = sp.run(&["exec", "s2", "--", "true"]);
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    let (st, _, reason) = sp.state("s2");
    assert_eq!(st, "error");
    assert!(reason.contains("did not answer"), "{reason}");
    assert_eq!(sp.sh("s2", "cat /root/file.txt"), "fork\n");

    // Bad input: clear errors and exit codes.
    assert_eq!(sp.run(&["get", "nope"]).status.code(), Some(3));
    assert_eq!(sp.run(&["create", "s1"]).status.code(), Some(4));
    assert_eq!(sp.run(&["create", "Bad_Name"]).status.code(), Some(5));
    assert_eq!(
        sp.run(&["checkpoint", "restore", "s1", "v99"])
            .status
            .code(),
        Some(3)
    );

    // Transitions are recorded with reasons.
    let v = sp.json(&["get", "s1"]);
    let tr: Vec<String> = v["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            format!(
                "{}:{}",
                t["to"].as_str().unwrap(),
                t["reason"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        tr.iter().any(|t| t.starts_with("hibernated:idle")),
        "{tr:?}"
    );
    assert!(tr.iter().any(|t| t == "waking:http request"), "{tr:?}");

    sp.ok(&["destroy", "s2"]);
    assert_eq!(sp.run(&["get", "s2"]).status.code(), Some(3));
    let vols = blockd.cli_json(&["volume", "list"]);
    assert!(
        !vols.to_string().contains("sprite-s2"),
        "the destroyed sprite's volume is gone: {vols}"
    );
}
