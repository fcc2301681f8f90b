//! Building fio command lines, running fio, and reading its JSON output.

use crate::jobs::Job;
use crate::process;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where fio sends its I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoTarget {
    /// A file through io_uring with O_DIRECT.
    File(PathBuf),
    /// An NBD export through fio's libnbd engine (`nbd+unix:///EXPORT?socket=PATH`).
    Nbd { uri: String },
}

impl IoTarget {
    pub fn nbd_unix(export: &str, socket: &Path) -> IoTarget {
        IoTarget::Nbd {
            uri: format!("nbd+unix:///{export}?socket={}", socket.display()),
        }
    }

    fn engine_args(&self) -> Vec<String> {
        match self {
            IoTarget::File(p) => vec![
                "--ioengine=io_uring".into(),
                "--direct=1".into(),
                format!("--filename={}", p.display()),
            ],
            IoTarget::Nbd { uri } => vec!["--ioengine=nbd".into(), format!("--uri={uri}")],
        }
    }
}

/// fio arguments of one measured job.
pub fn job_args(
    job: Job,
    target: &IoTarget,
    size: u64,
    runtime: u32,
    ramp_time: u32,
    output: &Path,
) -> Vec<String> {
    let mut a = vec![
        format!("--name={}", job.name()),
        format!("--rw={}", job.rw()),
        format!("--bs={}", job.bs()),
        format!("--iodepth={}", job.iodepth()),
        "--numjobs=1".into(),
        format!("--size={size}"),
        "--time_based".into(),
        format!("--runtime={runtime}s"),
        format!("--ramp_time={ramp_time}s"),
    ];
    if job.is_random() {
        // Uniform offsets over the whole export for the whole run (no "every block once"
        // map that would turn the tail of a long run into a nearly sequential pattern).
        a.push("--norandommap".into());
    }
    a.extend(target.engine_args());
    a.extend(output_args(output));
    a
}

/// fio arguments that fill the whole target sequentially with non-zero, non-repeating
/// data (1M blocks, QD8) and flush it at the end. blockd stores all-zero blocks as holes
/// and a file that was never written has no extents: either would make reads free.
/// `--refill_buffers` gives every write fresh random bytes, so nothing dedups or
/// compresses either.
pub fn precondition_args(target: &IoTarget, size: u64, output: &Path) -> Vec<String> {
    let mut a = vec![
        "--name=precondition".into(),
        "--rw=write".into(),
        "--bs=1M".into(),
        "--iodepth=8".into(),
        "--numjobs=1".into(),
        format!("--size={size}"),
        "--refill_buffers".into(),
        "--end_fsync=1".into(),
    ];
    if matches!(target, IoTarget::File(_)) {
        // Allocate the file up front so the layout step does not write it twice.
        a.push("--fallocate=native".into());
    }
    a.extend(target.engine_args());
    a.extend(output_args(output));
    a
}

fn output_args(output: &Path) -> [String; 2] {
    [
        "--output-format=json".into(),
        format!("--output={}", output.display()),
    ]
}

/// Runs fio with `args` (which must write JSON to `output`), logging its stderr to `log`,
/// and returns the JSON text.
pub fn run(fio: &Path, args: &[String], output: &Path, log: &Path) -> Result<String> {
    let _ = std::fs::remove_file(output);
    let stderr = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(fio);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    let mut child = process::Child::spawn(cmd, "fio")?;
    let status = child.wait()?;
    process::check_interrupted()?;
    if !status.success() {
        bail!(
            "fio failed ({status}); command: {} {}\n{}",
            fio.display(),
            args.join(" "),
            process::tail(log, 20)
        );
    }
    std::fs::read_to_string(output)
        .with_context(|| format!("reading fio output {}", output.display()))
}

/// One job's numbers, taken from the read or the write side of fio's report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measurement {
    pub iops: f64,
    /// Bandwidth in KiB/s (fio's `bw`).
    pub bw_kib: f64,
    pub clat_p50_us: Option<f64>,
    pub clat_p99_us: Option<f64>,
    pub clat_mean_us: f64,
    pub io_bytes: u64,
    /// Milliseconds fio measured (excludes ramp time).
    pub runtime_ms: u64,
    /// fio's own CPU use in percent of one core (user, system).
    pub fio_usr_cpu: f64,
    pub fio_sys_cpu: f64,
}

impl Measurement {
    pub fn mib_s(&self) -> f64 {
        self.bw_kib / 1024.0
    }
}

#[derive(Debug, Deserialize)]
struct FioJson {
    jobs: Vec<FioJob>,
}

#[derive(Debug, Deserialize)]
struct FioJob {
    jobname: String,
    #[serde(default)]
    error: i64,
    read: Side,
    write: Side,
    #[serde(default)]
    usr_cpu: f64,
    #[serde(default)]
    sys_cpu: f64,
}

#[derive(Debug, Deserialize)]
struct Side {
    iops: f64,
    bw: f64,
    #[serde(default)]
    io_bytes: u64,
    #[serde(default)]
    runtime: u64,
    clat_ns: Clat,
}

#[derive(Debug, Deserialize)]
struct Clat {
    #[serde(default)]
    mean: f64,
    /// Absent when the side did no I/O.
    #[serde(default)]
    percentile: BTreeMap<String, f64>,
}

/// Text before the JSON document (fio sometimes writes warnings into the output file).
fn json_start(text: &str) -> Option<usize> {
    if text.starts_with('{') {
        return Some(0);
    }
    text.find("\n{").map(|i| i + 1)
}

/// Parses fio's `--output-format=json` report of a single job. `write` selects the write
/// side (write jobs) instead of the read side.
pub fn parse(text: &str, write: bool) -> Result<Measurement> {
    let start = json_start(text).context("no JSON object in fio output")?;
    let doc: FioJson = serde_json::from_str(&text[start..]).context("parsing fio JSON output")?;
    let job = doc.jobs.first().context("fio JSON has no jobs")?;
    if job.error != 0 {
        bail!("fio job {} reported error {}", job.jobname, job.error);
    }
    let side = if write { &job.write } else { &job.read };
    let pct = |k: &str| side.clat_ns.percentile.get(k).map(|ns| ns / 1000.0);
    Ok(Measurement {
        iops: side.iops,
        bw_kib: side.bw,
        clat_p50_us: pct("50.000000"),
        clat_p99_us: pct("99.000000"),
        clat_mean_us: side.clat_ns.mean / 1000.0,
        io_bytes: side.io_bytes,
        runtime_ms: side.runtime,
        fio_usr_cpu: job.usr_cpu,
        fio_sys_cpu: job.sys_cpu,
    })
}

/// `fio --version` (e.g. `fio-3.33`).
pub fn version(fio: &Path) -> Result<String> {
    crate::sysinfo::command_first_line(fio, &["--version"])
}

/// Fails clearly when this fio lacks an engine we need.
pub fn check_engines(fio: &Path, engines: &[&str]) -> Result<()> {
    for e in engines {
        let out = Command::new(fio)
            .arg(format!("--enghelp={e}"))
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} --enghelp={e}", fio.display()))?;
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || text.contains("not found") || text.contains("failed to load") {
            bail!(
                "{} has no usable `{e}` ioengine (fio 3.33 from Debian's apt has io_uring and nbd): {}",
                fio.display(),
                text.trim()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANDREAD: &str = include_str!("../testdata/fio-randread-4k-qd1.json");
    const SEQWRITE: &str = include_str!("../testdata/fio-seqwrite-1m-qd8.json");

    #[test]
    fn parses_read_side() {
        let m = parse(RANDREAD, false).unwrap();
        assert!((m.iops - 13908.091908).abs() < 1e-6, "{m:?}");
        assert_eq!(m.bw_kib, 55632.0);
        assert_eq!(m.clat_p50_us, Some(44.8));
        assert_eq!(m.clat_p99_us, Some(128.512));
        assert_eq!(m.io_bytes, 57024512);
        assert_eq!(m.runtime_ms, 1001);
        assert!(m.fio_usr_cpu > 0.0 && m.fio_sys_cpu > 0.0);
    }

    #[test]
    fn parses_write_side_and_mib() {
        let m = parse(SEQWRITE, true).unwrap();
        assert_eq!(m.bw_kib, 2527840.0);
        assert!((m.mib_s() - 2468.59375).abs() < 1e-9);
        assert!(m.clat_p99_us.is_some());
        // The read side of a write job did nothing and has no percentiles.
        let r = parse(SEQWRITE, false).unwrap();
        assert_eq!(r.iops, 0.0);
        assert_eq!(r.clat_p50_us, None);
    }

    #[test]
    fn skips_warnings_before_json() {
        let text = format!("fio: file hash not empty on exit\n{RANDREAD}");
        assert_eq!(
            parse(&text, false).unwrap(),
            parse(RANDREAD, false).unwrap()
        );
    }

    #[test]
    fn rejects_garbage_and_job_errors() {
        assert!(parse("fio: engine nbd not loadable\n", false).is_err());
        assert!(parse("{\"jobs\": []}", false).is_err());
        let failed = RANDREAD.replacen("\"error\": 0", "\"error\": 5", 1);
        let e = parse(&failed, false).unwrap_err().to_string();
        assert!(e.contains("error 5"), "{e}");
    }

    #[test]
    fn job_command_lines() {
        let out = Path::new("/w/logs/x.json");
        let a = job_args(
            Job::RandRead4kQd32,
            &IoTarget::File("/w/raw.img".into()),
            4 << 30,
            15,
            2,
            out,
        );
        for want in [
            "--name=randread-4k-qd32",
            "--rw=randread",
            "--bs=4k",
            "--iodepth=32",
            "--numjobs=1",
            "--size=4294967296",
            "--time_based",
            "--runtime=15s",
            "--ramp_time=2s",
            "--norandommap",
            "--ioengine=io_uring",
            "--direct=1",
            "--filename=/w/raw.img",
            "--output-format=json",
            "--output=/w/logs/x.json",
        ] {
            assert!(a.iter().any(|x| x == want), "missing {want} in {a:?}");
        }
        let nbd = IoTarget::nbd_unix("bench", Path::new("/w/blockd/nbd.sock"));
        let a = job_args(Job::SeqWrite1mQd8, &nbd, 1 << 30, 3, 2, out);
        assert!(a.contains(&"--ioengine=nbd".to_string()));
        assert!(a.contains(&"--uri=nbd+unix:///bench?socket=/w/blockd/nbd.sock".to_string()));
        assert!(a.contains(&"--rw=write".to_string()));
        assert!(!a.iter().any(|x| x == "--norandommap" || x == "--direct=1"));

        let p = precondition_args(&nbd, 1 << 30, out);
        assert!(p.contains(&"--refill_buffers".to_string()));
        assert!(p.contains(&"--rw=write".to_string()));
        assert!(p.contains(&"--bs=1M".to_string()));
        assert!(!p.iter().any(|x| x.starts_with("--time_based")));
    }
}
