//! Command line: `fio-benches nbd [options]`.

use crate::jobs::Job;
use crate::targets::{NbdkitCache, QsdAio, Target};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Size and runtime used by `--quick` unless given explicitly.
pub const QUICK_SIZE: u64 = 256 << 20;
pub const QUICK_RUNTIME: u32 = 3;
pub const DEFAULT_SIZE: u64 = 4 << 30;
pub const DEFAULT_RUNTIME: u32 = 15;

#[derive(Debug, Parser)]
#[command(
    name = "fio-benches",
    version,
    about = "Compare blockd with its peers (raw file, qemu-storage-daemon, nbdkit) using one fio job set, in one run, on the same disk"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Benchmark NBD servers (and the raw file through io_uring as the machine's limit).
    Nbd(NbdArgs),
}

#[derive(Debug, Args)]
pub struct NbdArgs {
    /// Work directory (created if missing). Default: a new /var/tmp/fio-benches-<date>-<pid>.
    /// The data files (raw image, blockd data dir) are deleted at the end unless --keep;
    /// fio's JSON outputs and the server logs stay in <dir>/logs.
    #[arg(long)]
    pub dir: Option<PathBuf>,

    /// Export size: size of the raw file and of the blockd volume, and the fio I/O range
    /// (e.g. 4G, 512M, 1073741824). Default 4G (256M with --quick).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,

    /// Measured seconds per job (after --ramp-time). Default 15 (3 with --quick).
    #[arg(long)]
    pub runtime: Option<u32>,

    /// Seconds of warm-up per job that fio runs but does not count.
    #[arg(long, default_value_t = 2)]
    pub ramp_time: u32,

    /// Targets to measure, comma separated, always run in the order raw,
    /// qemu-storage-daemon, nbdkit, blockd.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "raw,qemu-storage-daemon,nbdkit,blockd"
    )]
    pub targets: Vec<Target>,

    /// Jobs to run, comma separated (default: all six). They always run in this order:
    /// reads on the sequentially preconditioned export, then writes, then the sequential
    /// read again on the aged export.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "randread-4k-qd32,randread-4k-qd1,seqread-1m-qd8,randwrite-4k-qd32,seqread-1m-qd8-aged,seqwrite-1m-qd8"
    )]
    pub jobs: Vec<Job>,

    /// Short smoke run of the harness itself: --size 256M --runtime 3 unless given.
    #[arg(long)]
    pub quick: bool,

    /// Target that ratios are computed against.
    #[arg(long, value_enum, default_value = "qemu-storage-daemon")]
    pub baseline: Target,

    /// blockd binary. Default: <workspace>/target/release/blockd (honours CARGO_TARGET_DIR).
    #[arg(long)]
    pub blockd: Option<PathBuf>,

    /// blockd's `object_store.url` during the run. `none` (default) measures the local
    /// data path alone, like the peers, which have no object store; `default` keeps
    /// blockd's default (write-back to `file://<data_dir>/objects` on the same disk: the
    /// uploader competes for CPU and disk with the jobs); any other value is used as is.
    #[arg(long, default_value = "none")]
    pub blockd_object_store: String,

    /// fio binary (needs the io_uring and nbd engines: fio >= 3.33 from apt has both).
    #[arg(long, default_value = "fio")]
    pub fio: PathBuf,

    /// qemu-storage-daemon binary.
    #[arg(long, default_value = "qemu-storage-daemon")]
    pub qemu_storage_daemon: PathBuf,

    /// nbdkit binary.
    #[arg(long, default_value = "nbdkit")]
    pub nbdkit: PathBuf,

    /// AIO backend of qemu-storage-daemon's file node. `auto` tries io_uring, then native,
    /// then threads, and records the one that started.
    #[arg(long, value_enum, default_value = "auto")]
    pub qsd_aio: QsdAio,

    /// nbdkit worker threads (`--threads`). The default matches the deepest queue of the
    /// job set, so nbdkit never caps the queue depth fio asks for.
    #[arg(long, default_value_t = 32)]
    pub nbdkit_threads: u32,

    /// nbdkit file plugin `cache=` mode. `default` goes through the page cache (reads of
    /// a file that fits in RAM become memory copies); `none` asks the kernel to drop pages
    /// after use (posix_fadvise, not O_DIRECT). The other targets all use O_DIRECT.
    #[arg(long, value_enum, default_value = "default")]
    pub nbdkit_cache: NbdkitCache,

    /// Write the raw numbers and run metadata as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Write a ready-to-paste Markdown report (metadata + table) to this file.
    #[arg(long)]
    pub markdown: Option<PathBuf>,

    /// Keep the data files (raw image, blockd data dir) in the work directory.
    #[arg(long)]
    pub keep: bool,
}

impl NbdArgs {
    pub fn effective_size(&self) -> u64 {
        self.size
            .unwrap_or(if self.quick { QUICK_SIZE } else { DEFAULT_SIZE })
    }

    pub fn effective_runtime(&self) -> u32 {
        self.runtime.unwrap_or(if self.quick {
            QUICK_RUNTIME
        } else {
            DEFAULT_RUNTIME
        })
    }

    /// Selected targets, deduplicated, in canonical order.
    pub fn selected_targets(&self) -> Vec<Target> {
        Target::ALL
            .iter()
            .copied()
            .filter(|t| self.targets.contains(t))
            .collect()
    }

    /// Selected jobs, deduplicated, in canonical order.
    pub fn selected_jobs(&self) -> Vec<Job> {
        Job::ALL
            .iter()
            .copied()
            .filter(|j| self.jobs.contains(j))
            .collect()
    }
}

/// A size as blockd parses it (`4G`, `256M`, `2GiB`, ...) that is a non-zero multiple of
/// 1 MiB (the sequential jobs use 1M blocks).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let v = blockd::size::parse_size(s)?;
    if v == 0 || !v.is_multiple_of(1 << 20) {
        return Err(format!(
            "invalid size {s:?}: must be a non-zero multiple of 1M"
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("4K").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("3X").is_err());
    }

    #[test]
    fn quick_defaults_and_overrides() {
        let cli = Cli::parse_from(["fio-benches", "nbd", "--quick"]);
        let Command::Nbd(a) = cli.cmd;
        assert_eq!(a.effective_size(), QUICK_SIZE);
        assert_eq!(a.effective_runtime(), QUICK_RUNTIME);
        assert_eq!(a.selected_targets(), Target::ALL.to_vec());
        assert_eq!(a.selected_jobs(), Job::ALL.to_vec());

        let cli = Cli::parse_from([
            "fio-benches",
            "nbd",
            "--quick",
            "--runtime",
            "7",
            "--targets",
            "blockd,raw,blockd",
            "--jobs",
            "seqread-1m-qd8,randread-4k-qd1",
        ]);
        let Command::Nbd(a) = cli.cmd;
        assert_eq!(a.effective_size(), QUICK_SIZE);
        assert_eq!(a.effective_runtime(), 7);
        assert_eq!(a.selected_targets(), vec![Target::Raw, Target::Blockd]);
        assert_eq!(
            a.selected_jobs(),
            vec![Job::RandRead4kQd1, Job::SeqRead1mQd8]
        );

        let cli = Cli::parse_from(["fio-benches", "nbd"]);
        let Command::Nbd(a) = cli.cmd;
        assert_eq!(a.effective_size(), DEFAULT_SIZE);
        assert_eq!(a.effective_runtime(), DEFAULT_RUNTIME);
    }
}
