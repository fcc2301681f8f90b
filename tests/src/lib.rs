//! Harness for end-to-end tests: runs the real `blockd` binary in a temporary data
//! directory and drives it with the CLI and real NBD clients.
//!
//! The binaries come from the workspace's target directory (`cargo build --workspace`
//! builds them; `scripts/test.sh` does so before running tests). `BLOCKD_BIN` overrides.

#![allow(clippy::unwrap_used)] // test harness: a failed step is a failed test

pub mod nbd;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Serializes the tests that boot guests on this machine (two emulated guests at once on 2
/// cores only make both slow). Held for the life of the returned file.
pub fn guest_lock(dir: &Path) -> std::fs::File {
    std::fs::create_dir_all(dir).unwrap();
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("guest.lock"))
        .unwrap();
    // SAFETY: flock on a valid fd we own; released when the file is closed.
    let r = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock: {}", std::io::Error::last_os_error());
    f
}

/// Path of a workspace binary (next to the test executable's `deps/` directory).
pub fn bin_path(name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(format!("{}_BIN", name.to_uppercase().replace('-', "_"))) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap(); // target/debug/deps
    let candidate = dir.parent().unwrap().join(name);
    assert!(
        candidate.exists(),
        "{} not found: build it first (cargo build -p {name})",
        candidate.display()
    );
    candidate
}

/// Runs a command with a timeout; returns its output (never hangs a test).
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `qemu-io -f raw URI -c CMD...`
pub fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(&mut c, Duration::from_secs(120))
}

/// Runs qemu-io commands and asserts that each succeeded (qemu-io exits 0 even when a
/// command fails, so its output is checked for failure messages too).
pub fn qemu_io_ok(uri: &str, cmds: &[&str]) -> String {
    let out = qemu_io(uri, cmds);
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    let all = format!("{so}{se}");
    assert!(
        out.status.success()
            && !all.contains("failed")
            && !all.contains("error")
            && !all.contains("Error"),
        "qemu-io {cmds:?} failed:\n{all}"
    );
    so
}

pub fn qemu_img(args: &[&str]) -> Output {
    run(
        Command::new("qemu-img").args(args),
        Duration::from_secs(300),
    )
}

/// A running `blockd serve` in its own data directory.
#[derive(Debug)]
pub struct Daemon {
    pub data_dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    env: Vec<(String, String)>,
    extra_args: Vec<String>,
}

/// Where the daemon serving `data_dir` logs (beside the data directory, so the test's
/// tempdir holds both).
fn log_path(data_dir: &Path) -> PathBuf {
    data_dir.with_extension("log")
}

impl Daemon {
    pub fn start(data_dir: &Path) -> Daemon {
        Self::start_with(data_dir, &[], &[])
    }

    /// Starts with extra environment (e.g. `FAILPOINTS`) and extra `serve` flags.
    pub fn start_with(data_dir: &Path, env: &[(&str, &str)], extra_args: &[&str]) -> Daemon {
        let mut d = Daemon {
            data_dir: data_dir.to_path_buf(),
            child: None,
            log: log_path(data_dir),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut c = Command::new(bin_path("blockd"));
        c.arg("--data-dir").arg(&self.data_dir).arg("serve");
        // No metrics listener unless the test asks for one (tests run in parallel).
        if !self.extra_args.iter().any(|a| a == "--metrics-addr") {
            c.args(["--metrics-addr", ""]);
        }
        c.args(&self.extra_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        self.child = Some(c.spawn().unwrap());
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "blockd exited during start ({s}); log:\n{}",
                    self.log_text()
                );
            }
            let out = self.cli(&["status"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "blockd did not become ready; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log's last `n` lines, for a failure message.
    pub fn log_tail(data_dir: &Path, n: usize) -> String {
        let log = std::fs::read_to_string(log_path(data_dir)).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.data_dir.join("nbd.sock")
    }

    pub fn uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.nbd_socket().display()
        )
    }

    /// Runs `blockd --data-dir DIR ARGS...` (the admin CLI).
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut c = Command::new(bin_path("blockd"));
        c.arg("--data-dir").arg(&self.data_dir).args(args);
        run(&mut c, Duration::from_secs(60))
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "blockd {args:?} failed ({}): {}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.cli_ok(&a)).unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL, no cleanup (a crash).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: sending a signal to our own child process.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let s = wait_timeout(&mut c, Duration::from_secs(30));
            assert!(
                s.success(),
                "blockd exited with {s}; log:\n{}",
                self.log_text()
            );
        }
    }

    /// Waits for the daemon to exit on its own (e.g. at a failpoint).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("daemon not running");
        wait_timeout(&mut c, timeout)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Starts again on the same data directory, with the given environment.
    pub fn restart_with(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "stop or kill the daemon first");
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn();
    }

    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }
}

/// SIGTERM, then SIGKILL if the process has not exited within `grace` (never panics: used
/// from `Drop`).
pub fn terminate(c: &mut Child, grace: Duration) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}

fn wait_timeout(c: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            panic!("process did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Deterministic non-zero content for block `lba` of generation `gen` (a 4 KiB block).
pub fn block_pattern(generation: u32, lba: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    let seed = (generation as u64) << 40 | lba;
    for (i, chunk) in b.chunks_mut(8).enumerate() {
        let v = seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(i as u64)
            .rotate_left(17)
            | 1;
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    b
}

/// Exports a whole volume to a raw file with `qemu-img convert` and returns its bytes.
pub fn dump(uri: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("dump-{}.raw", rand::random::<u32>()));
    let o = qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        uri,
        out.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "qemu-img convert failed: {}",
        text(&o.stderr)
    );
    let data = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    data
}

/// Writes a raw file into a volume with `qemu-img convert` (`-n`: the target exists).
pub fn load(file: &Path, uri: &str) {
    let o = qemu_img(&[
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        file.to_str().unwrap(),
        uri,
    ]);
    assert!(
        o.status.success(),
        "qemu-img convert failed: {}",
        text(&o.stderr)
    );
}

impl Daemon {
    /// Starts with a TOML config file (written next to the data directory as
    /// `<data_dir>.toml`) and extra `serve` flags.
    pub fn start_config(data_dir: &Path, config: &str, extra_args: &[&str]) -> Daemon {
        let path = data_dir.with_extension("toml");
        std::fs::write(&path, config).unwrap();
        let mut args = vec!["--config", path.to_str().unwrap()];
        args.extend_from_slice(extra_args);
        Self::start_with(data_dir, &[], &args)
    }
}

/// A real S3 server for end-to-end tests: moto (`moto_server`, installed by
/// scripts/setup.sh into `$SPRITES_VENV`, default /opt/sprites-venv) on a free local port
/// with one bucket, [`Moto::BUCKET`]; killed on drop. Fails (does not skip) when moto is
/// missing.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    pub const BUCKET: &'static str = "blockd-test";

    pub fn start() -> Moto {
        let venv = std::env::var_os("SPRITES_VENV")
            .map_or_else(|| PathBuf::from("/opt/sprites-venv"), PathBuf::from);
        let bin = venv.join("bin/moto_server");
        assert!(
            bin.exists(),
            "{} not found: run scripts/setup.sh (it installs moto, the S3 server these tests need)",
            bin.display()
        );
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let mut moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while moto.http("GET", "/").is_none() {
            if let Some(s) = moto.child.try_wait().unwrap() {
                panic!("moto_server exited early: {s}");
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // moto accepts unsigned requests: good enough for creating the bucket and listing.
        let (status, body) = moto
            .http("PUT", &format!("/{}", Self::BUCKET))
            .expect("creating the bucket: no answer");
        assert_eq!(status, 200, "creating bucket {}: {body}", Self::BUCKET);
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A minimal HTTP/1.1 request; the status code and body.
    fn http(&self, method: &str, path: &str) -> Option<(u16, String)> {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        );
        s.write_all(req.as_bytes()).ok()?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).ok()?;
        let resp = text(&resp);
        let status = resp.split_whitespace().nth(1)?.parse().ok()?;
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    }

    /// Keys (with their sizes) under `prefix` in the bucket, sorted.
    pub fn list(&self, prefix: &str) -> Vec<(String, u64)> {
        let enc = |s: &str| -> String {
            s.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect()
        };
        let tag = |body: &str, name: &str| -> Vec<String> {
            let (open, close) = (format!("<{name}>"), format!("</{name}>"));
            body.split(&open)
                .skip(1)
                .filter_map(|s| s.split_once(&close).map(|(v, _)| v.to_string()))
                .collect()
        };
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut path = format!("/{}?list-type=2&prefix={}", Self::BUCKET, enc(prefix));
            if let Some(t) = &token {
                path.push_str(&format!("&continuation-token={}", enc(t)));
            }
            let (status, body) = self
                .http("GET", &path)
                .unwrap_or_else(|| panic!("listing {prefix}: no answer from moto"));
            assert_eq!(status, 200, "listing {prefix}: {body}");
            for contents in tag(&body, "Contents") {
                let key = tag(&contents, "Key").pop().unwrap();
                let size = tag(&contents, "Size").pop().unwrap().parse().unwrap();
                out.push((key, size));
            }
            token = tag(&body, "NextContinuationToken").pop();
            if tag(&body, "IsTruncated").pop().as_deref() != Some("true") || token.is_none() {
                break;
            }
        }
        out.sort();
        out
    }

    /// A blockd config whose object store is `s3://BUCKET/<prefix>` on this server, followed
    /// by `extra` lines of the `[object_store]` section (e.g. `cache_size = "4M"`).
    pub fn blockd_config(&self, prefix: &str, extra: &str) -> String {
        format!(
            "[object_store]\n\
             url = \"s3://{}/{prefix}\"\n\
             endpoint = \"{}\"\n\
             region = \"us-east-1\"\n\
             access_key_id = \"test\"\n\
             secret_access_key = \"test\"\n\
             allow_http = true\n\
             {extra}\n",
            Self::BUCKET,
            self.endpoint()
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port that was free a moment ago (for a daemon's metrics listener).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `GET path` on `127.0.0.1:port` (HTTP/1.1, `Connection: close`): the body, or `None` if
/// nothing answered.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    let resp = text(&resp);
    resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// Sum of every sample of the Prometheus metric `name` (all label sets) in `body`.
pub fn metric_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
