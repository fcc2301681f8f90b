//! One run: prepare the disk, measure every selected target in turn, report.

use crate::cli::NbdArgs;
use crate::fio::{self, IoTarget};
use crate::jobs::Job;
use crate::process;
use crate::report::{JobResult, Precondition, Report, format_bytes};
use crate::sysinfo::{self, RunInfo};
use crate::targets::{self, Server, Target};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Everything a run needs, resolved from the command line.
#[derive(Debug)]
struct Plan {
    dir: PathBuf,
    logs: PathBuf,
    raw: PathBuf,
    blockd_dir: PathBuf,
    size: u64,
    runtime: u32,
    ramp: u32,
    targets: Vec<Target>,
    jobs: Vec<Job>,
    fio: PathBuf,
    qsd: Option<PathBuf>,
    nbdkit: Option<PathBuf>,
    blockd: Option<PathBuf>,
    blockd_object_store: String,
}

impl Plan {
    fn needs_raw_file(&self) -> bool {
        self.targets.iter().any(|t| *t != Target::Blockd)
    }
}

/// Runs the benchmark; returns the report (which may record per-target errors).
pub fn run(args: &NbdArgs) -> Result<Report> {
    let started = sysinfo::now_secs();
    let plan = plan(args, started)?;
    let mut info = run_info(args, &plan, started)?;
    let mut notes = Vec::new();
    let mut errors = Vec::new();
    let mut results = Vec::new();
    let mut preconditions = Vec::new();

    if let Some(one_min) = info
        .loadavg_start
        .as_deref()
        .and_then(|l| l.split(' ').next())
        .and_then(|l| l.parse::<f64>().ok())
        && one_min > 1.0
    {
        eprintln!(
            "warning: load average is {one_min} before the run: other work on this machine skews the numbers"
        );
    }
    if !plan.targets.contains(&args.baseline) {
        notes.push(format!(
            "baseline {} was not run: no ratios",
            args.baseline.name()
        ));
    }
    eprintln!(
        "fio-benches: work dir {}, export size {}, {} s per job (+{} s ramp), targets {}, jobs {}",
        plan.dir.display(),
        format_bytes(plan.size),
        plan.runtime,
        plan.ramp,
        plan.targets
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(","),
        plan.jobs
            .iter()
            .map(|j| j.name())
            .collect::<Vec<_>>()
            .join(",")
    );

    let outcome = (|| -> Result<()> {
        if plan.needs_raw_file() {
            eprintln!(
                "preconditioning {} ({}): sequential 1M writes of random data, io_uring, O_DIRECT",
                plan.raw.display(),
                format_bytes(plan.size)
            );
            let p = precondition(&plan, Target::Raw, &IoTarget::File(plan.raw.clone()))?;
            preconditions.push(p);
        }
        for &target in &plan.targets {
            process::check_interrupted()?;
            eprintln!("== {}", target.name());
            let mut target_results = Vec::new();
            let r = run_target(
                args,
                &plan,
                target,
                &mut info,
                &mut target_results,
                &mut preconditions,
                &mut notes,
            );
            process::check_interrupted()?;
            if let Err(e) = r {
                let msg = format!("{}: {e:#}", target.name());
                eprintln!("ERROR {msg}");
                errors.push(msg);
            }
            // Jobs that did not produce a result are reported as failed.
            for &job in &plan.jobs {
                if !target_results.iter().any(|r: &JobResult| r.job == job) {
                    target_results.push(JobResult {
                        target,
                        job,
                        measurement: None,
                        error: Some("not run: the target failed earlier".into()),
                        server_cpu_cores: None,
                        server_idle_cpu_cores: None,
                    });
                }
            }
            results.extend(target_results);
        }
        Ok(())
    })();

    if !args.keep {
        for p in [&plan.raw, &plan.blockd_dir] {
            let r = if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else if p.exists() {
                std::fs::remove_file(p)
            } else {
                Ok(())
            };
            if let Err(e) = r {
                eprintln!("warning: cannot remove {}: {e}", p.display());
            }
        }
    }
    outcome?;
    eprintln!("fio outputs and server logs: {}", plan.logs.display());

    Ok(Report {
        info,
        targets: plan.targets.clone(),
        jobs: plan.jobs.clone(),
        results,
        preconditions,
        notes,
        errors,
    })
}

fn plan(args: &NbdArgs, started: u64) -> Result<Plan> {
    let size = args.effective_size();
    let targets = args.selected_targets();
    let jobs = args.selected_jobs();
    if targets.is_empty() || jobs.is_empty() {
        bail!("nothing to do: no targets or no jobs selected");
    }

    let fio = process::find_program(&args.fio, "fio", "apt-get install fio")?;
    let mut engines = vec![];
    if targets.iter().any(|t| *t != Target::Blockd) {
        engines.push("io_uring");
    }
    if targets.iter().any(|t| *t != Target::Raw) {
        engines.push("nbd");
    }
    fio::check_engines(&fio, &engines)?;
    let qsd = targets
        .contains(&Target::QemuStorageDaemon)
        .then(|| {
            process::find_program(
                &args.qemu_storage_daemon,
                "qemu-storage-daemon",
                "install qemu-utils (>= 6.0), or leave it out with --targets",
            )
        })
        .transpose()?;
    let nbdkit = targets
        .contains(&Target::Nbdkit)
        .then(|| {
            process::find_program(
                &args.nbdkit,
                "nbdkit",
                "apt-get install nbdkit, or leave it out with --targets",
            )
        })
        .transpose()?;
    let blockd = if targets.contains(&Target::Blockd) {
        Some(blockd_binary(args)?)
    } else {
        None
    };

    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => PathBuf::from(format!(
            "/var/tmp/fio-benches-{}-{}",
            sysinfo::rfc3339_utc(started)
                .replace([':', '-'], "")
                .trim_end_matches('Z'),
            std::process::id()
        )),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    for bad in [':', ','] {
        // fio splits --filename on ':'; keep paths simple everywhere.
        if dir.display().to_string().contains(bad) {
            bail!("work dir {} must not contain {bad:?}", dir.display());
        }
    }
    let plan = Plan {
        raw: dir.join("raw.img"),
        blockd_dir: dir.join("blockd"),
        logs,
        dir,
        size,
        runtime: args.effective_runtime(),
        ramp: args.ramp_time,
        targets,
        jobs,
        fio,
        qsd,
        nbdkit,
        blockd,
        blockd_object_store: args.blockd_object_store.clone(),
    };
    // sun_path holds 107 bytes plus the NUL.
    for sock in [
        plan.dir.join("qemu-storage-daemon.sock"),
        plan.blockd_dir.join("admin.sock"),
    ] {
        if sock.as_os_str().len() > 107 {
            bail!(
                "socket path {} is too long for a unix socket: use a shorter --dir",
                sock.display()
            );
        }
    }
    check_space(&plan)?;
    Ok(plan)
}

fn blockd_binary(args: &NbdArgs) -> Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let explicit = args.blockd.is_some();
    let bin = match &args.blockd {
        Some(p) => p.clone(),
        None => {
            let target_dir = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .map(|t| {
                    if t.is_absolute() {
                        t
                    } else {
                        workspace.join(t)
                    }
                })
                .unwrap_or_else(|| workspace.join("target"));
            target_dir.join("release").join("blockd")
        }
    };
    if !bin.is_file() {
        bail!(
            "blockd binary not found at {}: build it with `cargo build --release -p blockd` \
             (in {}), pass --blockd PATH, or leave blockd out with --targets",
            bin.display(),
            workspace.display()
        );
    }
    if !explicit {
        warn_if_stale(&bin, &workspace);
    }
    Ok(bin)
}

/// Warns when workspace sources are newer than the blockd binary (a stale build would be
/// measured). Only looks at the crates blockd is built from.
fn warn_if_stale(bin: &Path, workspace: &Path) {
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return;
    };
    fn newest(dir: &Path, best: &mut Option<(std::time::SystemTime, PathBuf)>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                newest(&p, best);
            } else if p.extension().is_some_and(|x| x == "rs" || x == "toml")
                && let Ok(t) = m.modified()
                && best.as_ref().is_none_or(|(b, _)| t > *b)
            {
                *best = Some((t, p));
            }
        }
    }
    let mut best = None;
    for krate in ["blockd", "chunkstore", "snapshotter", "vhost-blk"] {
        newest(&workspace.join(krate).join("src"), &mut best);
        newest(&workspace.join(krate).join("Cargo.toml"), &mut best);
    }
    if let Some((t, p)) = best
        && t > built
    {
        eprintln!(
            "warning: {} is newer than {}: rebuild with `cargo build --release -p blockd` to measure the current code",
            p.display(),
            bin.display()
        );
    }
}

fn check_space(plan: &Plan) -> Result<()> {
    let mut need = 0u64;
    if plan.needs_raw_file() {
        need += plan.size;
    }
    if plan.targets.contains(&Target::Blockd) {
        // Data plus metadata and segment slack.
        need += plan.size + plan.size / 8 + (256 << 20);
    }
    let c = std::ffi::CString::new(plan.dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: statvfs writes into the zeroed struct we pass; `c` is NUL-terminated.
    let (rc, st) = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut st), st)
    };
    if rc != 0 {
        return Ok(());
    }
    // Both are u64 on 64-bit Linux.
    let avail = st.f_bavail.saturating_mul(st.f_frsize);
    if avail < need {
        bail!(
            "{} has {} free, the run needs about {}: use a smaller --size or another --dir",
            plan.dir.display(),
            format_bytes(avail),
            format_bytes(need)
        );
    }
    Ok(())
}

fn run_info(args: &NbdArgs, plan: &Plan, started: u64) -> Result<RunInfo> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf);
    Ok(RunInfo {
        command: sysinfo::command_line(),
        date: sysinfo::rfc3339_utc(started),
        fio_version: fio::version(&plan.fio)?,
        qemu_version: plan
            .qsd
            .as_deref()
            .map(|q| sysinfo::command_first_line(q, &["--version"]))
            .transpose()?,
        nbdkit_version: plan
            .nbdkit
            .as_deref()
            .map(|n| sysinfo::command_first_line(n, &["--version"]))
            .transpose()?,
        blockd_version: plan
            .blockd
            .as_deref()
            .map(|b| sysinfo::command_first_line(b, &["--version"]))
            .transpose()?,
        blockd_binary: plan.blockd.as_ref().map(|b| b.display().to_string()),
        workspace_git: workspace.as_deref().and_then(sysinfo::git_describe),
        kernel: sysinfo::kernel(),
        cpus: sysinfo::cpus(),
        cpu_model: sysinfo::cpu_model(),
        hostname: sysinfo::hostname(),
        loadavg_start: sysinfo::loadavg(),
        work_dir: plan.dir.display().to_string(),
        filesystem: sysinfo::filesystem(&plan.dir),
        size_bytes: plan.size,
        runtime_s: plan.runtime,
        ramp_time_s: plan.ramp,
        qsd_aio: None,
        nbdkit_threads: args.nbdkit_threads,
        nbdkit_cache: args.nbdkit_cache.name().into(),
        baseline: args.baseline.name().into(),
    })
}

/// Fills `io` sequentially (see `fio::precondition_args`).
fn precondition(plan: &Plan, target: Target, io: &IoTarget) -> Result<Precondition> {
    let out = plan
        .logs
        .join(format!("{}.precondition.json", target.name()));
    let log = plan
        .logs
        .join(format!("{}.precondition.fio.log", target.name()));
    let t0 = Instant::now();
    let json = fio::run(
        &plan.fio,
        &fio::precondition_args(io, plan.size, &out),
        &out,
        &log,
    )
    .with_context(|| format!("preconditioning {}", target.name()))?;
    let seconds = t0.elapsed().as_secs_f64();
    let m = fio::parse(&json, true)?;
    if m.io_bytes < plan.size {
        bail!(
            "preconditioning {} wrote only {} of {} bytes",
            target.name(),
            m.io_bytes,
            plan.size
        );
    }
    eprintln!(
        "  precondition {}: {} in {seconds:.1} s ({:.0} MiB/s incl. final flush)",
        target.name(),
        format_bytes(plan.size),
        plan.size as f64 / (1 << 20) as f64 / seconds
    );
    Ok(Precondition {
        target,
        seconds,
        mib_s: plan.size as f64 / (1 << 20) as f64 / seconds,
    })
}

/// Flushes and drops the raw file's pages from the page cache, so no target starts with
/// another target's cached data.
fn drop_page_cache(path: &Path) {
    if let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        let _ = f.sync_all();
        use std::os::fd::AsRawFd;
        // SAFETY: advisory call on a valid open fd.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

fn run_target(
    args: &NbdArgs,
    plan: &Plan,
    target: Target,
    info: &mut RunInfo,
    results: &mut Vec<JobResult>,
    preconditions: &mut Vec<Precondition>,
    notes: &mut Vec<String>,
) -> Result<()> {
    if target != Target::Blockd {
        drop_page_cache(&plan.raw);
    }
    let mut server: Option<Server> = match target {
        Target::Raw => None,
        Target::QemuStorageDaemon => {
            let bin = plan.qsd.as_deref().context("qemu-storage-daemon path")?;
            let sock = plan.dir.join("qemu-storage-daemon.sock");
            let (s, aio) = targets::start_qsd(bin, &plan.raw, &sock, args.qsd_aio, &plan.logs)?;
            info.qsd_aio = Some(aio.to_string());
            if aio != "io_uring" {
                notes.push(format!(
                    "qemu-storage-daemon ran with aio={aio} (io_uring was not used)"
                ));
            }
            Some(s)
        }
        Target::Nbdkit => {
            let bin = plan.nbdkit.as_deref().context("nbdkit path")?;
            let sock = plan.dir.join("nbdkit.sock");
            Some(targets::start_nbdkit(
                bin,
                &plan.raw,
                &sock,
                args.nbdkit_threads,
                args.nbdkit_cache,
                &plan.logs,
            )?)
        }
        Target::Blockd => {
            let bin = plan.blockd.as_deref().context("blockd path")?;
            let s = targets::start_blockd(
                bin,
                &plan.blockd_dir,
                plan.size,
                &plan.logs,
                &plan.blockd_object_store,
            )?;
            eprintln!(
                "  preconditioning blockd volume {} through NBD",
                targets::BLOCKD_VOLUME
            );
            preconditions.push(precondition(plan, Target::Blockd, &s.io)?);
            blockd_after_precondition(bin, plan, &s, notes);
            Some(s)
        }
    };
    if let Some(s) = &server {
        eprintln!("  {} pid {}: {}", target.name(), s.pid(), s.command);
        notes.push(format!("{} command: `{}`", target.name(), s.command));
    }
    let io = match &server {
        Some(s) => s.io.clone(),
        None => IoTarget::File(plan.raw.clone()),
    };

    for &job in &plan.jobs {
        process::check_interrupted()?;
        if let Some(s) = server.as_mut() {
            s.check_alive()?;
        }
        let out = plan
            .logs
            .join(format!("{}.{}.json", target.name(), job.name()));
        let log = plan
            .logs
            .join(format!("{}.{}.fio.log", target.name(), job.name()));
        let fio_args = fio::job_args(job, &io, plan.size, plan.runtime, plan.ramp, &out);
        // Background work the server still does from earlier jobs (e.g. blockd reclaiming
        // overwritten space) competes with this job: measure it while nothing is
        // connected.
        let server_idle_cpu_cores = server.as_ref().and_then(|s| idle_cpu(s.pid()));
        let cpu0 = server.as_ref().and_then(|s| process::cpu_time(s.pid()));
        let t0 = Instant::now();
        let r =
            fio::run(&plan.fio, &fio_args, &out, &log).and_then(|j| fio::parse(&j, job.is_write()));
        let wall = t0.elapsed();
        let cpu1 = server.as_ref().and_then(|s| process::cpu_time(s.pid()));
        let server_cpu_cores = match (cpu0, cpu1) {
            (Some(a), Some(b)) if wall > Duration::ZERO => {
                Some(b.saturating_sub(a).as_secs_f64() / wall.as_secs_f64())
            }
            _ => None,
        };
        match r {
            Ok(m) => {
                eprintln!(
                    "  {:<18} {:>10.0} IOPS {:>8.1} MiB/s  clat p50 {:>7.1} µs p99 {:>8.1} µs{}",
                    job.name(),
                    m.iops,
                    m.mib_s(),
                    m.clat_p50_us.unwrap_or(f64::NAN),
                    m.clat_p99_us.unwrap_or(f64::NAN),
                    server_cpu_cores
                        .map(|c| format!(
                            "  server {c:.2} cores ({:.2} idle before)",
                            server_idle_cpu_cores.unwrap_or(f64::NAN)
                        ))
                        .unwrap_or_default()
                );
                results.push(JobResult {
                    target,
                    job,
                    measurement: Some(m),
                    error: None,
                    server_cpu_cores,
                    server_idle_cpu_cores,
                });
            }
            Err(e) => {
                process::check_interrupted()?;
                // A dead server explains the failure better than fio does.
                if let Some(s) = server.as_mut() {
                    s.check_alive()
                        .with_context(|| format!("during {}", job.name()))?;
                }
                eprintln!("  {}: FAILED: {e:#}", job.name());
                results.push(JobResult {
                    target,
                    job,
                    measurement: None,
                    error: Some(format!("{e:#}")),
                    server_cpu_cores,
                    server_idle_cpu_cores,
                });
            }
        }
    }
    if let Some(s) = server.take() {
        let log = s.log.clone();
        let (took, cpu) = s.stop()?;
        let cpu = cpu
            .map(|c| format!(", using {:.1} s of CPU", c.as_secs_f64()))
            .unwrap_or_default();
        eprintln!(
            "  {} exited 0 {:.1} s after SIGTERM{cpu}",
            target.name(),
            took.as_secs_f64()
        );
        if took > Duration::from_secs(2) {
            notes.push(format!(
                "{} took {:.1} s to exit after SIGTERM{cpu}",
                target.name(),
                took.as_secs_f64()
            ));
        }
        if target == Target::Blockd {
            note_blockd_log(&log, notes);
        }
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| r.measurement.is_none())
        .map(|r| r.job.name())
        .collect();
    if !failed.is_empty() {
        bail!("jobs failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Cores a process uses over one second.
fn idle_cpu(pid: u32) -> Option<f64> {
    let window = Duration::from_secs(1);
    let a = process::cpu_time(pid)?;
    std::thread::sleep(window);
    let b = process::cpu_time(pid)?;
    Some(b.saturating_sub(a).as_secs_f64() / window.as_secs_f64())
}

/// Records blockd's accounting after the fill and checks it is not busy while idle.
fn blockd_after_precondition(bin: &Path, plan: &Plan, s: &Server, notes: &mut Vec<String>) {
    match targets::admin(
        bin,
        &plan.blockd_dir,
        &["--json", "volume", "stat", targets::BLOCKD_VOLUME],
    ) {
        Ok(out) => {
            let compact = serde_json::from_str::<serde_json::Value>(&out)
                .map(|v| v.to_string())
                .unwrap_or_else(|_| out.trim().to_string());
            eprintln!("  blockd volume stat after precondition: {compact}");
            notes.push(format!(
                "blockd volume stat after precondition: `{compact}`"
            ));
        }
        Err(e) => notes.push(format!("blockd volume stat failed: {e:#}")),
    }
    let idle = Duration::from_secs(2);
    if let Some(a) = process::cpu_time(s.pid()) {
        std::thread::sleep(idle);
        if let Some(b) = process::cpu_time(s.pid()) {
            let cores = b.saturating_sub(a).as_secs_f64() / idle.as_secs_f64();
            eprintln!("  blockd CPU while idle after precondition: {cores:.2} cores");
            if cores > 0.05 {
                notes.push(format!(
                    "blockd used {cores:.2} cores while idle for {idle:?} after preconditioning (background work during the first job)"
                ));
            }
        }
    }
}

/// Surfaces blockd's warnings and errors in the report.
fn note_blockd_log(log: &Path, notes: &mut Vec<String>) {
    let Ok(text) = std::fs::read_to_string(log) else {
        return;
    };
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panicked"))
        .collect();
    if !bad.is_empty() {
        notes.push(format!(
            "blockd logged {} warning/error lines (see {}); first: `{}`",
            bad.len(),
            log.display(),
            bad[0].trim()
        ));
    }
}
