//! Base images: built once (`sprited image build`), stored as a blockd volume with one
//! checkpoint. Every sprite's root volume is an O(1) clone of that checkpoint.

use anyhow::{Context, bail};
use blockd::client::AdminClient;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The build script (kept in the binary so `sprited` needs no source tree).
const BUILD_SCRIPT: &str = include_str!("../image/build-image.sh");

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    /// blockd volume holding the root filesystem.
    pub volume: String,
    /// Its checkpoint sprites are cloned from.
    pub checkpoint: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_version: String,
    pub size_bytes: u64,
    pub built_at_ms: u64,
    pub build_ms: u64,
}

pub fn image_volume(name: &str) -> String {
    format!("image-{name}")
}

fn record_path(images_dir: &Path, name: &str) -> PathBuf {
    images_dir.join(name).join("image.json")
}

pub fn load(images_dir: &Path, name: &str) -> anyhow::Result<ImageRecord> {
    let p = record_path(images_dir, name);
    let s = std::fs::read(&p).with_context(|| {
        format!(
            "image {name:?} not found ({}): build it with `sprited image build --name {name}`",
            p.display()
        )
    })?;
    serde_json::from_slice(&s).with_context(|| format!("reading {}", p.display()))
}

pub fn list(images_dir: &Path) -> Vec<ImageRecord> {
    let mut v: Vec<ImageRecord> = std::fs::read_dir(images_dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| load(images_dir, &e.file_name().to_string_lossy()).ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// The newest `/boot/vmlinuz-*` whose modules are installed.
pub fn host_kernel() -> anyhow::Result<String> {
    let mut found: Vec<String> = std::fs::read_dir("/boot")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let v = n.strip_prefix("vmlinuz-")?.to_string();
                    Path::new("/lib/modules").join(&v).is_dir().then_some(v)
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
        .pop()
        .context("no /boot/vmlinuz-* with modules under /lib/modules: install linux-image-amd64 (scripts/setup.sh)")
}

/// Builds the image files, writes the root filesystem into a new blockd volume over NBD
/// and checkpoints it.
pub async fn build(
    blockd: &AdminClient,
    nbd_socket: &Path,
    images_dir: &Path,
    name: &str,
    size_mib: u64,
    agent_bin: &Path,
) -> anyhow::Result<ImageRecord> {
    crate::manager::validate_name(name).map_err(anyhow::Error::msg)?;
    if record_path(images_dir, name).exists() {
        bail!("image {name:?} already exists (build under another name)");
    }
    if !agent_bin.exists() {
        bail!(
            "sprite-agent not found at {} (cargo build -p vmm-glue)",
            agent_bin.display()
        );
    }
    let env_bin = agent_bin.with_file_name("sprite-env");
    if !env_bin.exists() {
        bail!(
            "sprite-env not found at {} (cargo build -p vmm-glue)",
            env_bin.display()
        );
    }
    let t0 = Instant::now();
    let kver = host_kernel()?;
    let dir = images_dir.join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let script = dir.join("build-image.sh");
    std::fs::write(&script, BUILD_SCRIPT)?;
    let out = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .arg(&kver)
        .arg(agent_bin)
        .arg(size_mib.to_string())
        .output()
        .await
        .context("running the image build script")?;
    if !out.status.success() {
        bail!(
            "building image {name} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let volume = image_volume(name);
    let size_bytes = size_mib << 20;
    blockd
        .call(
            "POST",
            "/v1/volumes",
            Some(serde_json::json!({"name": volume, "size_bytes": size_bytes})),
        )
        .await
        .with_context(|| format!("creating volume {volume}"))?;
    let rootfs = dir.join("rootfs.ext4");
    let uri = format!("nbd+unix:///{volume}?socket={}", nbd_socket.display());
    let conv = tokio::process::Command::new("qemu-img")
        .args([
            "convert",
            "-n",
            "--target-is-zero",
            "-f",
            "raw",
            "-O",
            "raw",
        ])
        .arg(&rootfs)
        .arg(&uri)
        .output()
        .await
        .context("running qemu-img (install qemu-utils)")?;
    if !conv.status.success() {
        let _ = blockd
            .call("DELETE", &format!("/v1/volumes/{volume}?force=true"), None)
            .await;
        bail!(
            "writing the root filesystem into {volume} failed: {}",
            String::from_utf8_lossy(&conv.stderr)
        );
    }
    let ck = blockd
        .call(
            "POST",
            &format!("/v1/volumes/{volume}/checkpoints"),
            Some(serde_json::json!({"comment": format!("base image {name}")})),
        )
        .await?;
    let checkpoint = ck["id"].as_str().unwrap_or("v1").to_string();
    let _ = std::fs::remove_file(&rootfs);
    let rec = ImageRecord {
        name: name.to_string(),
        volume,
        checkpoint,
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initramfs.cpio.gz"),
        kernel_version: kver,
        size_bytes,
        built_at_ms: crate::manager::now_ms(),
        build_ms: t0.elapsed().as_millis() as u64,
    };
    crate::manager::write_json_atomic(&record_path(images_dir, name), &rec)?;
    Ok(rec)
}
