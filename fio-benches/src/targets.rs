//! The things being measured and the server processes behind them.

use crate::fio::IoTarget;
use crate::process::{self, Child};
use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use serde::Serialize;
use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// fio io_uring, O_DIRECT, on the raw file: the machine's limit.
    Raw,
    /// qemu-storage-daemon exporting the raw file over NBD (O_DIRECT).
    #[value(alias = "qsd")]
    QemuStorageDaemon,
    /// nbdkit's file plugin exporting the raw file.
    Nbdkit,
    /// blockd serving a preconditioned volume of the same size.
    Blockd,
}

impl Target {
    pub const ALL: [Target; 4] = [
        Target::Raw,
        Target::QemuStorageDaemon,
        Target::Nbdkit,
        Target::Blockd,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Raw => "raw",
            Target::QemuStorageDaemon => "qemu-storage-daemon",
            Target::Nbdkit => "nbdkit",
            Target::Blockd => "blockd",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QsdAio {
    Auto,
    #[value(name = "io_uring")]
    IoUring,
    Native,
    Threads,
}

impl QsdAio {
    fn name(self) -> &'static str {
        match self {
            QsdAio::Auto => "auto",
            QsdAio::IoUring => "io_uring",
            QsdAio::Native => "native",
            QsdAio::Threads => "threads",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NbdkitCache {
    Default,
    None,
}

impl NbdkitCache {
    pub fn name(self) -> &'static str {
        match self {
            NbdkitCache::Default => "default",
            NbdkitCache::None => "none",
        }
    }
}

const START_TIMEOUT: Duration = Duration::from_secs(60);
/// blockd flushes everything on SIGTERM; give it time before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(120);

/// A running NBD server; terminated (and reaped) at the latest when dropped.
#[derive(Debug)]
pub struct Server {
    pub target: Target,
    child: Child,
    pub log: PathBuf,
    /// What fio connects to.
    pub io: IoTarget,
    /// The exact server command line.
    pub command: String,
    /// Socket to remove after the server exited (qemu-storage-daemon and nbdkit leave
    /// theirs behind).
    socket: Option<PathBuf>,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Fails if the server died (e.g. crashed during a job).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!(
                "{} exited unexpectedly ({st})\n{}",
                self.target.name(),
                process::tail(&self.log, 30)
            );
        }
        Ok(())
    }

    /// SIGTERM, wait, and check for a clean exit (status 0). Returns how long the exit
    /// took and the CPU time the server used meanwhile.
    pub fn stop(mut self) -> Result<(Duration, Option<Duration>)> {
        let pid = self.child.pid();
        let cpu0 = process::cpu_time(pid);
        let mut cpu1 = cpu0;
        let t0 = Instant::now();
        // Sampled until the process is reaped: /proc/PID/stat of an exited but unreaped
        // child still holds its final CPU times.
        let (st, killed) = self.child.terminate_with(STOP_GRACE, || {
            if let Some(c) = process::cpu_time(pid) {
                cpu1 = Some(c);
            }
        })?;
        let took = t0.elapsed();
        let cpu = match (cpu0, cpu1) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        if killed {
            bail!(
                "{} did not exit within {:?} of SIGTERM and was killed\n{}",
                self.target.name(),
                STOP_GRACE,
                process::tail(&self.log, 30)
            );
        }
        // qemu-storage-daemon and nbdkit exit 0 on SIGTERM, blockd too after flushing.
        if !st.success() {
            bail!(
                "{} exited with {st} after SIGTERM (expected 0)\n{}",
                self.target.name(),
                process::tail(&self.log, 30)
            );
        }
        Ok((took, cpu))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The child is stopped by its own guard if `stop` did not run (error paths).
        let _ = self.child.terminate(STOP_GRACE);
        if let Some(sock) = &self.socket {
            let _ = std::fs::remove_file(sock);
        }
    }
}

fn shell_words(program: &Path, args: &[String]) -> String {
    std::iter::once(program.display().to_string())
        .chain(args.iter().cloned())
        .map(|w| crate::sysinfo::shell_quote(&w))
        .collect::<Vec<_>>()
        .join(" ")
}

fn spawn_logged(program: &Path, args: &[String], log: &Path, name: &str) -> Result<Child> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    Child::spawn(cmd, name)
}

/// Waits until `socket` accepts connections, failing early if the process exits.
fn wait_for_socket(child: &mut Child, name: &str, socket: &Path, log: &Path) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        process::check_interrupted()?;
        if let Some(st) = child.try_wait()? {
            bail!(
                "{name} exited during startup ({st})\n{}",
                process::tail(log, 30)
            );
        }
        if nbd_probe(socket).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{name} did not listen on {} within {START_TIMEOUT:?}\n{}",
                socket.display(),
                process::tail(log, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connects to an NBD server, reads its newstyle greeting and leaves politely with
/// NBD_OPT_ABORT, so servers do not log a failed handshake for every readiness probe.
fn nbd_probe(socket: &Path) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind, Read, Write};
    const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
    const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
    const NBD_OPT_ABORT: u32 = 2;
    // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
    const CLIENT_FLAGS: u32 = 0b11;
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting)?;
    if &greeting[..8] != NBDMAGIC || greeting[8..16] != IHAVEOPT.to_be_bytes() {
        return Err(Error::new(
            ErrorKind::InvalidData,
            "not an NBD newstyle server",
        ));
    }
    let mut msg = Vec::with_capacity(20);
    msg.extend_from_slice(&CLIENT_FLAGS.to_be_bytes());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&NBD_OPT_ABORT.to_be_bytes());
    msg.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&msg)?;
    // The server acknowledges the abort (20-byte option reply); wait for it so that it is
    // the server that closes first.
    let mut reply = [0u8; 20];
    let _ = s.read_exact(&mut reply);
    Ok(())
}

/// Starts qemu-storage-daemon on `raw` with O_DIRECT. With `QsdAio::Auto` tries io_uring,
/// native and threads in turn; returns the server and the aio mode that worked.
pub fn start_qsd(
    bin: &Path,
    raw: &Path,
    socket: &Path,
    aio: QsdAio,
    logs: &Path,
) -> Result<(Server, &'static str)> {
    let candidates: &[QsdAio] = match aio {
        QsdAio::Auto => &[QsdAio::IoUring, QsdAio::Native, QsdAio::Threads],
        QsdAio::IoUring => &[QsdAio::IoUring],
        QsdAio::Native => &[QsdAio::Native],
        QsdAio::Threads => &[QsdAio::Threads],
    };
    let mut failures = Vec::new();
    for &mode in candidates {
        let _ = std::fs::remove_file(socket);
        let log = logs.join(format!("qemu-storage-daemon.aio-{}.log", mode.name()));
        let args = qsd_args(raw, socket, mode.name());
        let mut child = spawn_logged(bin, &args, &log, "qemu-storage-daemon")?;
        match wait_for_socket(&mut child, "qemu-storage-daemon", socket, &log) {
            Ok(()) => {
                let server = Server {
                    target: Target::QemuStorageDaemon,
                    child,
                    log,
                    io: IoTarget::nbd_unix("disk", socket),
                    command: shell_words(bin, &args),
                    socket: Some(socket.to_path_buf()),
                };
                return Ok((server, mode.name()));
            }
            Err(e) => {
                process::check_interrupted()?;
                eprintln!(
                    "  qemu-storage-daemon with aio={} failed to start; {}",
                    mode.name(),
                    if candidates.len() > 1 {
                        "trying the next aio mode"
                    } else {
                        "giving up"
                    }
                );
                failures.push(format!("aio={}: {e:#}", mode.name()));
            }
        }
    }
    bail!(
        "qemu-storage-daemon did not start:\n{}",
        failures.join("\n")
    )
}

fn qsd_args(raw: &Path, socket: &Path, aio: &str) -> Vec<String> {
    vec![
        "--blockdev".into(),
        format!(
            "driver=file,node-name=file0,filename={},cache.direct=on,aio={aio}",
            qemu_escape(&raw.display().to_string())
        ),
        "--blockdev".into(),
        "driver=raw,node-name=disk,file=file0".into(),
        "--nbd-server".into(),
        format!(
            "addr.type=unix,addr.path={}",
            qemu_escape(&socket.display().to_string())
        ),
        "--export".into(),
        "type=nbd,id=exp0,node-name=disk,name=disk,writable=on".into(),
    ]
}

/// QEMU option values escape ',' by doubling it.
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// Starts nbdkit's file plugin on `raw`.
pub fn start_nbdkit(
    bin: &Path,
    raw: &Path,
    socket: &Path,
    threads: u32,
    cache: NbdkitCache,
    logs: &Path,
) -> Result<Server> {
    let _ = std::fs::remove_file(socket);
    let log = logs.join("nbdkit.log");
    let args: Vec<String> = vec![
        "--foreground".into(),
        "--exit-with-parent".into(),
        "--unix".into(),
        socket.display().to_string(),
        "--threads".into(),
        threads.to_string(),
        "file".into(),
        format!("file={}", raw.display()),
        format!("cache={}", cache.name()),
    ];
    let mut child = spawn_logged(bin, &args, &log, "nbdkit")?;
    wait_for_socket(&mut child, "nbdkit", socket, &log)?;
    Ok(Server {
        target: Target::Nbdkit,
        child,
        log,
        // The file plugin serves the same file under any export name.
        io: IoTarget::nbd_unix("", socket),
        command: shell_words(bin, &args),
        socket: Some(socket.to_path_buf()),
    })
}

/// The NBD export name of the benchmark volume.
pub const BLOCKD_VOLUME: &str = "bench";

/// Starts blockd on a fresh data dir, waits for `blockd status`, and creates the volume.
pub fn start_blockd(
    bin: &Path,
    data_dir: &Path,
    size: u64,
    logs: &Path,
    object_store: &str,
) -> Result<Server> {
    if data_dir.exists() {
        std::fs::remove_dir_all(data_dir)
            .with_context(|| format!("removing old {}", data_dir.display()))?;
    }
    std::fs::create_dir_all(data_dir)?;
    let log = logs.join("blockd.log");
    let dd = data_dir.display().to_string();
    let mut args: Vec<String> = vec![
        "--data-dir".into(),
        dd.clone(),
        "serve".into(),
        "--metrics-addr".into(),
        String::new(),
    ];
    if object_store != "default" {
        // Next to the data dir, which is wiped before each start.
        let config = logs.join("blockd.toml");
        std::fs::write(
            &config,
            format!("[object_store]\nurl = {:?}\n", object_store),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        args.push("--config".into());
        args.push(config.display().to_string());
    }
    let mut child = spawn_logged(bin, &args, &log, "blockd")?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        process::check_interrupted()?;
        if let Some(st) = child.try_wait()? {
            bail!(
                "blockd exited during startup ({st})\n{}",
                process::tail(&log, 30)
            );
        }
        if admin(bin, data_dir, &["status"]).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            let last = admin(bin, data_dir, &["status"])
                .err()
                .map(|e| format!("{e:#}"));
            bail!(
                "`blockd status` did not succeed within {START_TIMEOUT:?}: {}\n{}",
                last.unwrap_or_default(),
                process::tail(&log, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    admin(
        bin,
        data_dir,
        &[
            "volume",
            "create",
            BLOCKD_VOLUME,
            "--size",
            &size.to_string(),
        ],
    )
    .context("creating the benchmark volume")?;
    let socket = data_dir.join("nbd.sock");
    wait_for_socket(&mut child, "blockd", &socket, &log)?;
    Ok(Server {
        target: Target::Blockd,
        child,
        log,
        io: IoTarget::nbd_unix(BLOCKD_VOLUME, &socket),
        command: shell_words(bin, &args),
        socket: None,
    })
}

/// Runs a blockd admin command against the daemon on `data_dir`; returns its stdout.
pub fn admin(bin: &Path, data_dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} {}", bin.display(), args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`blockd {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qsd_command_line() {
        let a = qsd_args(
            Path::new("/w/raw.img"),
            Path::new("/w/qsd.sock"),
            "io_uring",
        );
        assert_eq!(
            a[1],
            "driver=file,node-name=file0,filename=/w/raw.img,cache.direct=on,aio=io_uring"
        );
        assert_eq!(a[5], "addr.type=unix,addr.path=/w/qsd.sock");
        let a = qsd_args(Path::new("/w/a,b.img"), Path::new("/w/s"), "native");
        assert!(a[1].contains("filename=/w/a,,b.img,"));
    }

    #[test]
    fn nbd_probe_speaks_newstyle() {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixListener;
        let dir = std::env::temp_dir().join(format!("fio-benches-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            // An NBD server: greeting, then expect client flags + NBD_OPT_ABORT.
            let (mut c, _) = listener.accept().unwrap();
            let mut g = b"NBDMAGIC".to_vec();
            g.extend_from_slice(b"IHAVEOPT");
            g.extend_from_slice(&3u16.to_be_bytes());
            c.write_all(&g).unwrap();
            let mut got = [0u8; 20];
            c.read_exact(&mut got).unwrap();
            c.write_all(&[0u8; 20]).unwrap();
            // Anything else: not NBD.
            let (mut c, _) = listener.accept().unwrap();
            c.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
            got
        });
        nbd_probe(&sock).unwrap();
        assert!(nbd_probe(&sock).is_err());
        let got = server.join().unwrap();
        assert_eq!(&got[..4], &3u32.to_be_bytes());
        assert_eq!(&got[4..12], b"IHAVEOPT");
        assert_eq!(&got[12..16], &2u32.to_be_bytes());
        assert_eq!(&got[16..20], &0u32.to_be_bytes());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn target_names_parse() {
        for t in Target::ALL {
            assert_eq!(Target::from_str(t.name(), false), Ok(t));
        }
        assert_eq!(
            Target::from_str("qsd", false),
            Ok(Target::QemuStorageDaemon)
        );
    }
}
