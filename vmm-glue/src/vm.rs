//! Launching VMs. [`Launcher`] is the seam for other VMMs (Cloud Hypervisor, Firecracker):
//! a launcher turns a [`VmSpec`] into a running [`Vm`] whose disk is blockd's vhost-user-blk
//! socket and whose guest runtime is reachable on a unix socket. [`QemuLauncher`] is the one
//! implemented: QEMU with KVM when a probe boot works, TCG otherwise, driven over QMP.

use anyhow::{Context, anyhow, bail};
use async_trait::async_trait;
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Everything a VMM needs to boot a sprite.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    /// Directory for this VM's sockets and logs (created by the launcher).
    pub run_dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// blockd's vhost-user-blk socket of the root volume.
    pub disk_socket: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u64,
}

#[async_trait]
pub trait Vm: Send + Sync + std::fmt::Debug {
    /// Unix socket of the guest runtime's port.
    fn agent_socket(&self) -> PathBuf;
    /// Host process id (metering: CPU time).
    fn pid(&self) -> Option<u32>;
    /// Stops the vCPUs; memory is kept.
    async fn pause(&self) -> anyhow::Result<()>;
    async fn resume(&self) -> anyhow::Result<()>;
    /// Asks the VMM to exit now (the guest gets no shutdown; sync it first).
    async fn quit(&self, timeout: Duration) -> anyhow::Result<()>;
    /// SIGKILL.
    fn kill(&self);
    /// `Some(reason)` once the VMM process has exited.
    fn exited(&self) -> Option<String>;
    /// Last lines of the VMM's log and the guest console, for error reports.
    fn diagnostics(&self) -> String;
}

#[async_trait]
pub trait Launcher: Send + Sync + std::fmt::Debug {
    fn name(&self) -> String;
    async fn launch(&self, spec: &VmSpec) -> anyhow::Result<Box<dyn Vm>>;
}

/// A QMP connection (one command at a time).
#[derive(Debug)]
pub struct Qmp {
    conn: tokio::sync::Mutex<(
        BufReader<tokio::net::unix::OwnedReadHalf>,
        tokio::net::unix::OwnedWriteHalf,
    )>,
}

impl Qmp {
    pub async fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Qmp> {
        let deadline = tokio::time::Instant::now() + timeout;
        let s = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(e)
                        .with_context(|| format!("connecting to QMP at {}", path.display()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (r, w) = s.into_split();
        let q = Qmp {
            conn: tokio::sync::Mutex::new((BufReader::new(r), w)),
        };
        {
            let mut c = q.conn.lock().await;
            let mut greeting = String::new();
            tokio::time::timeout(timeout, c.0.read_line(&mut greeting))
                .await
                .context("QMP greeting timed out")??;
            if !greeting.contains("QMP") {
                bail!("unexpected QMP greeting: {greeting}");
            }
        }
        q.execute("qmp_capabilities", serde_json::Value::Null, timeout)
            .await?;
        Ok(q)
    }

    /// Runs a command; returns its `return` value (events in between are skipped).
    pub async fn execute(
        &self,
        cmd: &str,
        args: serde_json::Value,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let mut c = self.conn.lock().await;
        let mut msg = serde_json::json!({ "execute": cmd });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let fut = async {
            c.1.write_all(line.as_bytes()).await?;
            loop {
                let mut l = String::new();
                if c.0.read_line(&mut l).await? == 0 {
                    bail!("QMP connection closed");
                }
                let v: serde_json::Value = serde_json::from_str(&l)
                    .with_context(|| format!("malformed QMP message: {l}"))?;
                if let Some(r) = v.get("return") {
                    return Ok(r.clone());
                }
                if let Some(e) = v.get("error") {
                    bail!("QMP {cmd}: {}", e["desc"].as_str().unwrap_or("error"));
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| anyhow!("QMP {cmd} timed out after {timeout:?}"))?
    }
}

/// Accelerator choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

#[derive(Debug)]
pub struct QemuLauncher {
    pub binary: String,
    /// `kvm`, `tcg` or `auto`.
    pub accel_choice: String,
    /// Where the probe's answer is cached.
    pub cache: PathBuf,
    accel: tokio::sync::OnceCell<Accel>,
}

impl QemuLauncher {
    /// `accel`: `kvm`, `tcg` or `auto` (probe KVM once, at the first launch, with a timeout;
    /// the answer is cached in `cache`).
    pub async fn new(accel: &str, cache: &Path) -> anyhow::Result<QemuLauncher> {
        let binary = "qemu-system-x86_64".to_string();
        let ok = tokio::process::Command::new(&binary)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("{binary} not found: install qemu-system-x86 (scripts/setup.sh)");
        }
        if !["kvm", "tcg", "auto"].contains(&accel) {
            bail!("unknown accelerator {accel:?} (kvm, tcg or auto)");
        }
        Ok(QemuLauncher {
            binary,
            accel_choice: accel.to_string(),
            cache: cache.to_path_buf(),
            accel: tokio::sync::OnceCell::new(),
        })
    }

    async fn accel(&self, kernel: &Path, initrd: &Path) -> Accel {
        *self
            .accel
            .get_or_init(|| async {
                match self.accel_choice.as_str() {
                    "kvm" => Accel::Kvm,
                    "tcg" => Accel::Tcg,
                    _ => match std::fs::read_to_string(&self.cache)
                        .ok()
                        .as_deref()
                        .map(str::trim)
                    {
                        Some("kvm") => Accel::Kvm,
                        Some("tcg") => Accel::Tcg,
                        _ => {
                            let a = probe_kvm(&self.binary, kernel, initrd).await;
                            let _ = std::fs::write(&self.cache, a.as_str());
                            tracing::info!(accel = a.as_str(), "accelerator probed");
                            a
                        }
                    },
                }
            })
            .await
    }
}

/// Boots the kernel with `sprite.probe` under KVM: the image's initramfs prints
/// `SPRITE-PROBE-OK` and powers off. KVM is usable only if that happens within 15 s
/// (/dev/kvm can exist and hang).
async fn probe_kvm(binary: &str, kernel: &Path, initrd: &Path) -> Accel {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Accel::Tcg;
    }
    let child = tokio::process::Command::new(binary)
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args([
            "-machine", "pc", "-accel", "kvm", "-cpu", "host", "-m", "256M",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1 sprite.probe"])
        .args(["-serial", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut child) = child else {
        return Accel::Tcg;
    };
    let Some(out) = child.stdout.take() else {
        return Accel::Tcg;
    };
    let mut lines = BufReader::new(out).lines();
    let found = tokio::time::timeout(Duration::from_secs(15), async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.contains("SPRITE-PROBE-OK") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    let _ = child.kill().await;
    if found { Accel::Kvm } else { Accel::Tcg }
}

#[async_trait]
impl Launcher for QemuLauncher {
    fn name(&self) -> String {
        match self.accel.get() {
            Some(a) => format!("qemu/{}", a.as_str()),
            None => format!("qemu/{}", self.accel_choice),
        }
    }

    async fn launch(&self, spec: &VmSpec) -> anyhow::Result<Box<dyn Vm>> {
        let accel = self.accel(&spec.kernel, &spec.initrd).await;
        std::fs::create_dir_all(&spec.run_dir)
            .with_context(|| format!("creating {}", spec.run_dir.display()))?;
        // QMP and the runtime's port control the VM: owner only.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&spec.run_dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("securing {}", spec.run_dir.display()))?;
        }
        let qmp = spec.run_dir.join("qmp.sock");
        let agent = spec.run_dir.join("agent.sock");
        let console = spec.run_dir.join("console.log");
        let log = spec.run_dir.join("qemu.log");
        for p in [&qmp, &agent] {
            let _ = std::fs::remove_file(p);
        }
        let mem = format!("{}M", spec.memory_mib);
        let mut c = tokio::process::Command::new(&self.binary);
        c.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-name", &spec.name])
        .args(["-machine", "pc", "-accel", accel.as_str()])
        .args(["-cpu", if accel == Accel::Kvm { "host" } else { "max" }])
        .args(["-smp", &spec.vcpus.to_string(), "-m", &mem])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        ])
        .args(["-numa", "node,memdev=mem"])
        .arg("-kernel")
        .arg(&spec.kernel)
        .arg("-initrd")
        .arg(&spec.initrd)
        .args(["-append", &spec.cmdline])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-chardev")
        .arg(format!(
            "socket,id=disk0,path={},reconnect-ms=500",
            spec.disk_socket.display()
        ))
        .args([
            "-device",
            "vhost-user-blk-pci,chardev=disk0,num-queues=1,bootindex=1",
        ])
        .args(["-device", "virtio-serial-pci,id=vser0"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=agent0,path={},server=on,wait=off",
            agent.display()
        ))
        .args([
            "-device",
            &format!(
                "virtserialport,bus=vser0.0,chardev=agent0,name={}",
                crate::proto::PORT_NAME
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).context("creating the QEMU log")?)
        .kill_on_drop(true);
        let mut child = c
            .spawn()
            .with_context(|| format!("starting {}", self.binary))?;
        let pid = child.id();
        let started = Instant::now();
        let q = match Qmp::connect(&qmp, Duration::from_secs(20)).await {
            Ok(q) => q,
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                let tail = tail_of(&log, 2000);
                bail!("QEMU did not start: {e:#}\n{tail}");
            }
        };
        tracing::debug!(name = %spec.name, ms = started.elapsed().as_millis() as u64, "QEMU up");
        Ok(Box::new(QemuVm {
            child: Mutex::new(child),
            pid,
            qmp: q,
            agent,
            console,
            log,
        }))
    }
}

#[derive(Debug)]
pub struct QemuVm {
    child: Mutex<tokio::process::Child>,
    pid: Option<u32>,
    qmp: Qmp,
    agent: PathBuf,
    console: PathBuf,
    log: PathBuf,
}

fn tail_of(p: &Path, max: usize) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let start = s.len().saturating_sub(max);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

const QMP_TIMEOUT: Duration = Duration::from_secs(10);

#[async_trait]
impl Vm for QemuVm {
    fn agent_socket(&self) -> PathBuf {
        self.agent.clone()
    }

    fn pid(&self) -> Option<u32> {
        self.pid
    }

    async fn pause(&self) -> anyhow::Result<()> {
        self.qmp
            .execute("stop", serde_json::Value::Null, QMP_TIMEOUT)
            .await
            .map(|_| ())
    }

    async fn resume(&self) -> anyhow::Result<()> {
        self.qmp
            .execute("cont", serde_json::Value::Null, QMP_TIMEOUT)
            .await
            .map(|_| ())
    }

    async fn quit(&self, timeout: Duration) -> anyhow::Result<()> {
        let _ = self
            .qmp
            .execute("quit", serde_json::Value::Null, QMP_TIMEOUT)
            .await;
        let deadline = Instant::now() + timeout;
        while self.exited().is_none() {
            if Instant::now() > deadline {
                self.kill();
                bail!("QEMU did not exit within {timeout:?}; killed");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn kill(&self) {
        let mut c = self.child.lock();
        let _ = c.start_kill();
        // Reap so that exited() sees it.
        for _ in 0..200 {
            if matches!(c.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn exited(&self) -> Option<String> {
        match self.child.lock().try_wait() {
            Ok(Some(st)) => Some(format!("QEMU exited ({st})")),
            Ok(None) => None,
            Err(e) => Some(format!("QEMU status unknown: {e}")),
        }
    }

    fn diagnostics(&self) -> String {
        format!(
            "--- QEMU log ---\n{}\n--- guest console (tail) ---\n{}",
            tail_of(&self.log, 2000),
            tail_of(&self.console, 3000)
        )
    }
}
