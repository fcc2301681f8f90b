//! Facts about the machine and the tools, recorded with every report.

use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Default, Serialize)]
pub struct RunInfo {
    /// The exact command line of this run.
    pub command: String,
    /// UTC start time (RFC 3339).
    pub date: String,
    pub fio_version: String,
    pub qemu_version: Option<String>,
    pub nbdkit_version: Option<String>,
    pub blockd_version: Option<String>,
    pub blockd_binary: Option<String>,
    /// `git describe --always --dirty` of the workspace, if available.
    pub workspace_git: Option<String>,
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: Option<String>,
    pub hostname: Option<String>,
    /// /proc/loadavg (1, 5, 15 min) at the start of the run: other work on the machine
    /// skews the numbers. (Not at the end: by then it is mostly the run itself.)
    pub loadavg_start: Option<String>,
    pub work_dir: String,
    /// Filesystem of the work dir (from /proc/self/mounts), e.g. `ext4 /dev/vda`.
    pub filesystem: Option<String>,
    pub size_bytes: u64,
    pub runtime_s: u32,
    pub ramp_time_s: u32,
    /// The aio mode qemu-storage-daemon ran with.
    pub qsd_aio: Option<String>,
    pub nbdkit_threads: u32,
    pub nbdkit_cache: String,
    pub baseline: String,
}

/// First non-empty line of `program args...` (stdout, else stderr).
pub fn command_first_line(program: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} {}", program.display(), args.join(" ")))?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    match text.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(l) if out.status.success() => Ok(l.to_string()),
        _ => bail!(
            "`{} {}` failed ({}): {}",
            program.display(),
            args.join(" "),
            out.status,
            text.trim()
        ),
    }
}

pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

pub fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> Option<String> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
}

/// The filesystem type and source of the mount holding `path`.
pub fn filesystem(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3).then(|| (f[0], f[1], f[2]))
        })
        .filter(|(_, mnt, _)| path.starts_with(mnt))
        .max_by_key(|(_, mnt, _)| mnt.len())
        .map(|(src, _, fs)| format!("{fs} {src}"))
}

pub fn git_describe(dir: &Path) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["describe", "--always", "--dirty"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// This process's command line, shell-quoted.
pub fn command_line() -> String {
    let mut args = std::env::args();
    let argv0 = args.next().unwrap_or_else(|| "fio-benches".into());
    std::iter::once(argv0)
        .chain(args)
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes a word for a POSIX shell when needed.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub use vmm_glue::services::rfc3339_utc;

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("--size=4G"), "--size=4G");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
