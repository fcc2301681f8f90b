//! A real Linux guest on a blockd volume over vhost-user-blk: QEMU boots the host's Debian
//! kernel with a busybox initramfs (built by `tests/guest/build-initramfs.sh`), whose /init
//! runs the shell lines this test sends on the serial console. KVM is used when it works
//! (probed once with a timeout and cached; `SPRITES_GUEST_ACCEL=kvm|tcg` overrides), TCG
//! otherwise. The tests fail when QEMU, the kernel or busybox-static is missing
//! (`scripts/setup.sh` installs them).

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tests::{Daemon, qemu_io, text};

const CMD_TIMEOUT: Duration = Duration::from_secs(120);
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cache_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn guest_lock() -> std::fs::File {
    tests::guest_lock(&cache_dir())
}

struct Kernel {
    image: PathBuf,
    version: String,
}

/// The newest /boot/vmlinuz-* whose modules are installed.
fn kernel() -> Kernel {
    let mut found: Vec<Kernel> = std::fs::read_dir("/boot")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let version = name.strip_prefix("vmlinuz-")?.to_string();
                    Path::new("/lib/modules")
                        .join(&version)
                        .is_dir()
                        .then(|| Kernel {
                            image: e.path(),
                            version,
                        })
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort_by(|a, b| a.version.cmp(&b.version));
    found.pop().unwrap_or_else(|| {
        panic!("no /boot/vmlinuz-* with modules in /lib/modules: install linux-image-amd64 (scripts/setup.sh)")
    })
}

/// Builds (once per kernel and script version) the test initramfs.
fn initramfs(k: &Kernel) -> PathBuf {
    let dir = workspace_dir().join("tests/guest");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for f in ["build-initramfs.sh", "init"] {
        for b in std::fs::read(dir.join(f)).unwrap() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    let out = cache_dir().join(format!("initramfs-{}-{h:016x}.cpio.gz", k.version));
    if !out.exists() {
        let o = tests::run(
            Command::new("bash")
                .arg(dir.join("build-initramfs.sh"))
                .arg(&out)
                .arg(&k.version),
            Duration::from_secs(120),
        );
        assert!(
            o.status.success(),
            "building the initramfs failed: {}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
    }
    out
}

fn qemu_binary() -> &'static str {
    let q = "qemu-system-x86_64";
    let ok = Command::new(q)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{q} not found: scripts/setup.sh installs qemu-system-x86"
    );
    q
}

/// `kvm` if a guest boots under KVM within a timeout, else `tcg` (FACTS: /dev/kvm may exist
/// and hang). Cached per machine in the target directory.
fn accel(k: &Kernel, initrd: &Path) -> String {
    if let Ok(a) = std::env::var("SPRITES_GUEST_ACCEL") {
        return a;
    }
    let cache = cache_dir().join("accel");
    if let Ok(a) = std::fs::read_to_string(&cache) {
        return a.trim().to_string();
    }
    let kvm_usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let mut chosen = "tcg".to_string();
    if kvm_usable {
        let mut g = Guest::spawn("kvm", k, initrd, None, &cache_dir().join("probe-qemu.log"));
        if g.wait_for("@@BOOTED", Duration::from_secs(10)).is_ok() {
            chosen = "kvm".into();
        }
        g.kill();
    }
    let _ = std::fs::write(&cache, &chosen);
    eprintln!("guest accelerator: {chosen}");
    chosen
}

/// A QEMU guest driven over its serial console.
struct Guest {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    console: Arc<Mutex<String>>,
    qemu_log: PathBuf,
}

impl Guest {
    fn spawn(
        accel: &str,
        k: &Kernel,
        initrd: &Path,
        disk: Option<&Path>,
        qemu_log: &Path,
    ) -> Guest {
        let mut c = Command::new(qemu_binary());
        c.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-machine", "pc", "-accel", accel, "-smp", "1", "-m", "512M"])
        .args(["-cpu", if accel == "kvm" { "host" } else { "max" }])
        .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .arg("-kernel")
        .arg(&k.image)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet loglevel=3 panic=-1"])
        .args(["-serial", "stdio"]);
        if let Some(sock) = disk {
            c.arg("-chardev")
                .arg(format!(
                    "socket,id=c0,path={},reconnect-ms=500",
                    sock.display()
                ))
                .args(["-device", "vhost-user-blk-pci,chardev=c0,num-queues=2"]);
        }
        let log = std::fs::File::create(qemu_log).unwrap();
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start QEMU: {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        let console = Arc::new(Mutex::new(String::new()));
        let con = console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let l = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_string();
                con.lock().unwrap().push_str(&format!("{l}\n"));
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Guest {
            child,
            stdin,
            lines,
            console,
            qemu_log: qemu_log.to_path_buf(),
        }
    }

    fn boot(k: &Kernel, initrd: &Path, accel: &str, disk: &Path, qemu_log: &Path) -> Guest {
        let mut g = Guest::spawn(accel, k, initrd, Some(disk), qemu_log);
        if let Err(e) = g.wait_for("@@READY", BOOT_TIMEOUT) {
            g.fail(&format!("guest did not boot: {e}"));
        }
        g
    }

    fn logs(&self) -> String {
        format!(
            "--- guest console ---\n{}--- QEMU stderr ---\n{}",
            self.console.lock().unwrap(),
            std::fs::read_to_string(&self.qemu_log).unwrap_or_default()
        )
    }

    fn fail(&mut self, msg: &str) -> ! {
        self.kill();
        panic!("{msg}\n{}", self.logs());
    }

    /// Lines until one starting with `marker` (included).
    fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<Vec<String>, String> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let done = l.starts_with(marker);
                    out.push(l);
                    if done {
                        return Ok(out);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("timed out after {timeout:?} waiting for {marker}"));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("QEMU exited while waiting for {marker}"));
                }
            }
        }
    }

    /// Sends one shell line (the guest answers "@@END <status>" when it is done).
    fn send(&mut self, cmd: &str) {
        assert!(!cmd.contains('\n'));
        if let Err(e) = writeln!(self.stdin, "{cmd}").and_then(|_| self.stdin.flush()) {
            self.fail(&format!("cannot write to the guest console: {e}"));
        }
    }

    /// Waits for the end of the command sent last; returns its status and output.
    fn wait_end(&mut self, what: &str) -> (i32, Vec<String>) {
        match self.wait_for("@@END ", CMD_TIMEOUT) {
            Ok(mut lines) => {
                let end = lines.pop().unwrap();
                let rc = end["@@END ".len()..].trim().parse().unwrap_or(-1);
                (rc, lines)
            }
            Err(e) => self.fail(&format!("{what}: {e}")),
        }
    }

    /// Runs a shell line and requires success; returns its output.
    fn run(&mut self, cmd: &str) -> Vec<String> {
        self.send(cmd);
        let (rc, out) = self.wait_end(cmd);
        if rc != 0 {
            self.fail(&format!("`{cmd}` failed with status {rc}: {out:?}"));
        }
        out
    }

    /// Commands the guest has finished so far.
    fn ends_seen(&self) -> usize {
        self.console.lock().unwrap().matches("@@END ").count()
    }

    /// `sha256sum` of the given guest paths: path -> hex digest.
    fn sums(&mut self, paths: &str) -> BTreeMap<String, String> {
        self.run(&format!("sha256sum {paths}"))
            .iter()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let (h, p) = (it.next()?, it.next()?);
                (h.len() == 64).then(|| (p.to_string(), h.to_string()))
            })
            .collect()
    }

    fn poweroff(mut self) {
        self.send("sync; poweroff -f");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => self.fail("guest did not power off"),
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Env {
    dir: tempfile::TempDir,
    daemon: Daemon,
    kernel: Kernel,
    initrd: PathBuf,
    accel: String,
    boots: usize,
    _lock: std::fs::File,
}

impl Env {
    fn new(volume_size: &str) -> Env {
        let lock = guest_lock();
        let kernel = kernel();
        let initrd = initramfs(&kernel);
        let accel = accel(&kernel, &initrd);
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon::start(&dir.path().join("blockd"));
        daemon.cli_ok(&["volume", "create", "vm", "--size", volume_size]);
        Env {
            dir,
            daemon,
            kernel,
            initrd,
            accel,
            boots: 0,
            _lock: lock,
        }
    }

    fn socket(&self) -> PathBuf {
        self.daemon.data_dir.join("vhost/vm.sock")
    }

    fn boot(&mut self) -> Guest {
        self.boots += 1;
        let log = self.dir.path().join(format!("qemu-{}.log", self.boots));
        Guest::boot(
            &self.kernel,
            &self.initrd,
            &self.accel,
            &self.socket(),
            &log,
        )
    }

    fn head_bytes(&self) -> u64 {
        self.daemon.cli_json(&["volume", "stat", "vm"])["head_bytes"]
            .as_u64()
            .unwrap()
    }

    /// Waits until QEMU's connection is gone from the volume (after poweroff).
    fn wait_detached(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.daemon.cli_json(&["volume", "stat", "vm"])["attached_clients"] != 0 {
            assert!(
                Instant::now() < deadline,
                "the VM's attachment did not go away"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

const MIB: u64 = 1 << 20;

/// mkfs, files with known checksums, fstrim space accounting, the attach rule, then
/// checkpoint / change / restore across three boots: the restored files are exactly the
/// checkpointed ones.
#[test]
fn guest_checkpoint_restore_and_trim() {
    let mut env = Env::new("256M");

    // Boot 1: a filesystem and files.
    let mut g = env.boot();
    let lbs = g.run("cat /sys/block/vda/queue/logical_block_size");
    assert_eq!(
        lbs,
        vec!["4096".to_string()],
        "guest sees 4 KiB logical blocks"
    );
    g.run("/usr/sbin/mkfs.ext4 -q -F /dev/vda");
    g.run("mount -t ext4 /dev/vda /mnt");
    g.run("for i in 1 2 3 4 5; do dd if=/dev/urandom of=/mnt/f$i bs=64k count=$((i * 3)) 2>/dev/null || exit 1; done");
    g.run("mkdir /mnt/dir && echo hello sprites > /mnt/dir/small && sync");
    let v1 = g.sums("/mnt/f1 /mnt/f2 /mnt/f3 /mnt/f4 /mnt/f5 /mnt/dir/small");
    assert_eq!(v1.len(), 6, "{v1:?}");

    // While the VM holds the volume, NBD clients are refused with a clear reason.
    let out = qemu_io(&env.daemon.uri("vm"), &["read 0 4k"]);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        all.contains("vhost-user"),
        "NBD must be refused while a VM is attached: {all}"
    );

    // A big file costs its size; deleting it and trimming gives the space back.
    let before = env.head_bytes();
    g.run("dd if=/dev/urandom of=/mnt/big bs=1M count=48 2>/dev/null && sync");
    let with_big = env.head_bytes();
    assert!(
        with_big >= before + 46 * MIB,
        "head_bytes {before} -> {with_big} after writing 48 MiB"
    );
    g.run("rm /mnt/big && sync && /usr/sbin/fstrim -v /mnt");
    let trimmed = env.head_bytes();
    assert!(
        trimmed + 46 * MIB <= with_big,
        "fstrim must release the deleted file: head_bytes {with_big} -> {trimmed}"
    );
    g.run("umount /mnt");
    g.poweroff();
    env.wait_detached();

    let cp = env
        .daemon
        .cli_json(&["checkpoint", "create", "vm", "--comment", "boot 1"]);
    let id = format!("v{}", cp["id"].as_u64().unwrap());

    // Boot 2: change things.
    let mut g = env.boot();
    g.run("mount -t ext4 /dev/vda /mnt");
    g.run("dd if=/dev/urandom of=/mnt/f1 bs=64k count=5 2>/dev/null && rm /mnt/f2 && echo new > /mnt/f6 && echo changed >> /mnt/dir/small && sync");
    let v2 = g.sums("/mnt/f1 /mnt/f3 /mnt/f6 /mnt/dir/small");
    assert_ne!(v2["/mnt/f1"], v1["/mnt/f1"]);
    assert_ne!(v2["/mnt/dir/small"], v1["/mnt/dir/small"]);
    g.run("umount /mnt");
    g.poweroff();
    env.wait_detached();

    env.daemon.cli_ok(&["checkpoint", "restore", "vm", &id]);

    // Boot 3: exactly the checkpointed files, and a clean filesystem.
    let mut g = env.boot();
    g.run("/usr/sbin/e2fsck -f -n /dev/vda");
    g.run("mount -t ext4 /dev/vda /mnt");
    let v3 = g.sums("/mnt/f1 /mnt/f2 /mnt/f3 /mnt/f4 /mnt/f5 /mnt/dir/small");
    assert_eq!(v3, v1, "restored content must be the checkpoint's");
    let listing = g.run("ls /mnt");
    assert!(
        !listing
            .iter()
            .any(|l| l.contains("f6") || l.contains("big")),
        "{listing:?}"
    );
    g.run("umount /mnt");
    g.poweroff();
}

/// blockd stops (cleanly, then with kill -9) while the guest is writing; QEMU reconnects
/// when it is back and the guest carries on: everything synced before is intact and fsck
/// finds the filesystem clean.
#[test]
fn guest_survives_blockd_restarts() {
    let mut env = Env::new("256M");
    let mut g = env.boot();
    g.run("/usr/sbin/mkfs.ext4 -q -F /dev/vda && mount -t ext4 /dev/vda /mnt");
    g.run("for i in 1 2 3; do dd if=/dev/urandom of=/mnt/a$i bs=64k count=32 2>/dev/null || exit 1; done; sync");
    let before = g.sums("/mnt/a1 /mnt/a2 /mnt/a3");

    // Writes, each followed by a sync (so I/O is always in flight or about to be), while
    // blockd stops cleanly and comes back (for 3 s of guest time: still running when blockd
    // goes away, carrying on after)...
    let writer = |f: &str| {
        format!(
            "end=$(( $(cut -d. -f1 /proc/uptime) + 3 )); i=0; while [ $(cut -d. -f1 /proc/uptime) -lt $end ]; do dd if=/dev/urandom of={f} bs=64k count=1 seek=$((i % 64)) conv=notrunc 2>/dev/null && sync || exit 1; i=$((i + 1)); done; sha256sum {f}"
        )
    };
    let ends = g.ends_seen();
    g.send(&writer("/mnt/b1"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        g.ends_seen(),
        ends,
        "the writer must still be running when blockd stops"
    );
    env.daemon.stop();
    std::thread::sleep(Duration::from_millis(700));
    env.daemon.restart();
    let (rc, out) = g.wait_end("writes across a clean restart");
    assert_eq!(rc, 0, "{out:?}\n{}", g.logs());
    let b1: Vec<&String> = out.iter().filter(|l| l.contains("/mnt/b1")).collect();
    assert_eq!(b1.len(), 1, "{out:?}");

    // ...and while it is killed (kill -9) and restarted.
    let ends = g.ends_seen();
    g.send(&writer("/mnt/b2"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        g.ends_seen(),
        ends,
        "the writer must still be running when blockd dies"
    );
    env.daemon.kill9();
    std::thread::sleep(Duration::from_millis(500));
    env.daemon.restart();
    let (rc, out) = g.wait_end("writes across kill -9");
    assert_eq!(rc, 0, "{out:?}\n{}", g.logs());

    // No I/O error reached the guest; everything is still there, before and after a
    // remount, and the filesystem is clean.
    g.run("! dmesg | grep -iE 'I/O error|EXT4-fs error|blk_update_request|Buffer I/O'");
    g.run("sync; echo 3 > /proc/sys/vm/drop_caches");
    let after = g.sums("/mnt/a1 /mnt/a2 /mnt/a3 /mnt/b1 /mnt/b2");
    for (p, h) in &before {
        assert_eq!(&after[p], h, "{p} changed across restarts");
    }
    assert!(b1[0].starts_with(&after["/mnt/b1"]), "{b1:?} vs {after:?}");
    g.run("umount /mnt && /usr/sbin/e2fsck -f -n /dev/vda");
    g.run("mount -t ext4 /dev/vda /mnt");
    let remounted = g.sums("/mnt/a1 /mnt/a2 /mnt/a3 /mnt/b1 /mnt/b2");
    assert_eq!(remounted, after);
    g.run("umount /mnt");
    g.poweroff();
    // QEMU reconnected after each restart.
    let log = env.daemon.log_text();
    assert!(
        log.matches("VM attached over vhost-user").count() >= 3,
        "{log}"
    );
}
