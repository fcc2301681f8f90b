//! vhost-user-blk benchmark: blockd against qemu-storage-daemon's vhost-user-blk export of a
//! raw file on the same disk, in one run, with the same client, printing ratios.
//!
//! ```sh
//! cargo build --release -p blockd -p fio-benches
//! target/release/vhost-compare                 # 2G, 10 s per job (~4 min)
//! target/release/vhost-compare --quick         # 256M, 3 s per job
//! ```
//!
//! # The client, and why it is fair
//!
//! fio has no vhost-user engine here (no libblkio), and fio inside a TCG guest would measure
//! the emulator. The client is `vhost_blk::client`, a host-side vhost-user-blk driver: it
//! maps its "guest memory" from a memfd, sets up split virtqueues and submits virtio-blk
//! requests the way Linux's virtio_blk does (header / data / status descriptors, data split
//! at the device's `size_max`, EVENT_IDX kick and interrupt suppression), keeping a fixed
//! number of requests in flight per queue and sleeping on the call eventfd between
//! completions. Both servers see the identical request stream (same offsets from the same
//! seed, same queue count, same write data: random bytes, so blockd cannot store holes),
//! from the same process. Latency is the client's submit-to-completion time.
//!
//! # What one run does
//!
//! 1. Creates `raw.img` (`--size`) and fills it with random data (buffered writes + fsync).
//! 2. qemu-storage-daemon: `--blockdev driver=file,filename=raw.img,cache.direct=on,
//!    aio=io_uring --blockdev driver=raw --export type=vhost-user-blk,...,writable=on,
//!    num-queues=N`; runs the jobs; SIGTERM.
//! 3. blockd (release build, fresh data dir): `volume create`, fills the volume through
//!    the same client with 1 MiB writes of random data, runs the jobs; SIGTERM (must exit 0).
//! 4. Prints, per job, IOPS (or MiB/s) of each and blockd / qemu-storage-daemon, latency
//!    p50/p99, and each server's CPU use during the job (cores).
//!
//! | job | requests | in flight |
//! |---|---|---|
//! | randread-4k-qd32 | 4 KiB random reads | 32 (split over the queues) |
//! | randread-4k-qd1 | 4 KiB random reads, one queue | 1 |
//! | seqread-1m-qd8 | 1 MiB sequential reads (a region per queue), on the filled disk | 8 |
//! | randwrite-4k-qd32 | 4 KiB random writes | 32 |
//! | seqread-1m-qd8-aged | the same sequential reads after the random writes | 8 |
//! | seqread-1m-qd8-reread | the same sequential reads once more (blockd: after its reads defragmented the layout) | 8 |
//! | seqwrite-1m-qd8 | 1 MiB sequential writes | 8 |
//!
//! Jobs run in this order, like the NBD harness's: the aged row shows what random
//! overwrites do to a log-structured layout, which an in-place store does not have.

#[path = "../process.rs"]
#[allow(dead_code)]
mod process;

use anyhow::{Context, Result, bail};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vhost_blk::client::{BlkRequest, Client, ClientConfig, ClientQueue};

#[derive(Debug, Parser)]
#[command(about = "blockd vs qemu-storage-daemon over vhost-user-blk, same client, same run")]
struct Args {
    /// blockd's `object_store.url`: `none` (default: the local data path alone, like the
    /// peer), `default` (blockd's default write-back to a directory on the same disk), or
    /// a URL.
    #[arg(long, default_value = "none")]
    blockd_object_store: String,
    /// Work directory (default: a new /var/tmp/vhost-compare-<pid>); data files are removed.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Disk size (raw file and volume), e.g. 2G.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Measured seconds per job.
    #[arg(long)]
    runtime: Option<u64>,
    /// Warm-up seconds per job (not measured).
    #[arg(long, default_value_t = 2)]
    ramp: u64,
    /// Virtqueues used (and offered by both servers).
    #[arg(long, default_value_t = 2)]
    queues: u16,
    /// --size 256M --runtime 3 unless given.
    #[arg(long)]
    quick: bool,
    /// Jobs to run (comma separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "randread-4k-qd32,randread-4k-qd1,seqread-1m-qd8,randwrite-4k-qd32,seqread-1m-qd8-aged,seqread-1m-qd8-reread,seqwrite-1m-qd8"
    )]
    jobs: Vec<String>,
    /// blockd binary (default: <workspace>/target/release/blockd).
    #[arg(long)]
    blockd: Option<PathBuf>,
    #[arg(long, default_value = "qemu-storage-daemon")]
    qemu_storage_daemon: PathBuf,
    /// Only these targets (comma separated: qsd, blockd).
    #[arg(long, value_delimiter = ',', default_value = "qsd,blockd")]
    targets: Vec<String>,
    /// A blockd config setting `SECTION.KEY=VALUE` (VALUE in TOML, e.g.
    /// `storage.map_cache=0` or `storage.defrag_on_read=false`); repeatable.
    #[arg(long = "blockd-set", value_parser = parse_setting)]
    blockd_set: Vec<(String, String, String)>,
}

/// `SECTION.KEY=VALUE` of `--blockd-set`.
fn parse_setting(s: &str) -> Result<(String, String, String), String> {
    let (path, value) = s.split_once('=').unwrap_or_default();
    let (section, key) = path.split_once('.').unwrap_or_default();
    if section.is_empty() || key.is_empty() || value.is_empty() {
        return Err("expected SECTION.KEY=VALUE, e.g. storage.map_cache=0".into());
    }
    Ok((section.into(), key.into(), value.into()))
}

/// blockd's config file for the run: the object store choice and the `--blockd-set`
/// settings, grouped by section (None: blockd's defaults).
fn blockd_config(args: &Args) -> Option<String> {
    let mut sections: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    if args.blockd_object_store != "default" {
        sections
            .entry("object_store")
            .or_default()
            .push(format!("url = {:?}", args.blockd_object_store));
    }
    for (section, key, value) in &args.blockd_set {
        sections
            .entry(section)
            .or_default()
            .push(format!("{key} = {value}"));
    }
    if sections.is_empty() {
        return None;
    }
    Some(
        sections
            .iter()
            .map(|(s, lines)| format!("[{s}]\n{}\n", lines.join("\n")))
            .collect(),
    )
}

/// A size as blockd parses it, a non-zero multiple of 1 MiB.
fn parse_size(s: &str) -> Result<u64, String> {
    let v = blockd::size::parse_size(s)?;
    if v == 0 || !v.is_multiple_of(1 << 20) {
        return Err("size must be a non-zero multiple of 1M".into());
    }
    Ok(v)
}

#[derive(Debug, Clone, Copy)]
struct Job {
    name: &'static str,
    block: u32,
    depth: u32,
    write: bool,
    random: bool,
    /// All queues (true) or one.
    all_queues: bool,
}

/// In the order they run (the NBD harness's order): reads on the sequentially filled disk
/// first, then the random writes, then the sequential read again on the layout the random
/// writes aged (blockd's log-structured cost), then the sequential writes.
const JOBS: [Job; 7] = [
    Job {
        name: "randread-4k-qd32",
        block: 4096,
        depth: 32,
        write: false,
        random: true,
        all_queues: true,
    },
    Job {
        name: "randread-4k-qd1",
        block: 4096,
        depth: 1,
        write: false,
        random: true,
        all_queues: false,
    },
    Job {
        name: "seqread-1m-qd8",
        block: 1 << 20,
        depth: 8,
        write: false,
        random: false,
        all_queues: true,
    },
    Job {
        name: "randwrite-4k-qd32",
        block: 4096,
        depth: 32,
        write: true,
        random: true,
        all_queues: true,
    },
    Job {
        name: "seqread-1m-qd8-aged",
        block: 1 << 20,
        depth: 8,
        write: false,
        random: false,
        all_queues: true,
    },
    Job {
        name: "seqread-1m-qd8-reread",
        block: 1 << 20,
        depth: 8,
        write: false,
        random: false,
        all_queues: true,
    },
    Job {
        name: "seqwrite-1m-qd8",
        block: 1 << 20,
        depth: 8,
        write: true,
        random: false,
        all_queues: true,
    },
];

#[derive(Debug, Default, Clone)]
struct Result1 {
    ios: u64,
    bytes: u64,
    secs: f64,
    lat_us: Vec<u32>,
    server_cpu: f64,
}

impl Result1 {
    fn iops(&self) -> f64 {
        self.ios as f64 / self.secs
    }
    fn mibs(&self) -> f64 {
        self.bytes as f64 / self.secs / (1 << 20) as f64
    }
    fn pct(&self, p: f64) -> u32 {
        if self.lat_us.is_empty() {
            return 0;
        }
        let mut v = self.lat_us.clone();
        v.sort_unstable();
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn client_config(queues: u16) -> ClientConfig {
    ClientConfig {
        num_queues: queues,
        queue_size: 256,
        slots: 64,
        slot_bytes: 1 << 20,
        scratch_bytes: 4096,
        event_idx: true,
    }
}

/// Drives one queue: keeps `depth` requests in flight until `end`; measures after `ramp_end`.
fn drive(
    mut q: ClientQueue,
    job: Job,
    depth: u32,
    region: (u64, u64),
    seed: u64,
    ramp_end: Instant,
    end: Instant,
) -> Result<Result1> {
    let mut rng = Rng(seed | 1);
    if job.write {
        q.fill_slots(|b| rng.fill(b))?;
    }
    let (start, len) = region;
    let blocks = len / u64::from(job.block);
    let mut seq = 0u64;
    let t0 = Instant::now();
    let mut r = Result1::default();
    let mut next = |rng: &mut Rng| {
        let i = if job.random {
            rng.next() % blocks
        } else {
            let i = seq % blocks;
            seq += 1;
            i
        };
        (start + i * u64::from(job.block)) / 512
    };
    let mut measured_from = None;
    loop {
        let now = Instant::now();
        if now < end {
            while q.in_flight() < depth as usize {
                let sector = next(&mut rng);
                let req = if job.write {
                    BlkRequest::Write {
                        sector,
                        len: job.block,
                    }
                } else {
                    BlkRequest::Read {
                        sector,
                        len: job.block,
                    }
                };
                let tag = t0.elapsed().as_nanos() as u64;
                q.submit(&req, tag, false)?;
            }
            q.notify()?;
        } else if q.in_flight() == 0 {
            break;
        }
        for c in q.wait(Duration::from_secs(30))? {
            if c.status != Some(0) {
                bail!("{}: request failed with status {:?}", job.name, c.status);
            }
            let done = Instant::now();
            if done >= ramp_end && done < end {
                measured_from.get_or_insert(done);
                r.ios += 1;
                r.bytes += u64::from(job.block);
                let lat = t0.elapsed().as_nanos() as u64 - c.tag;
                r.lat_us.push((lat / 1000).min(u64::from(u32::MAX)) as u32);
            }
        }
    }
    r.secs = end.saturating_duration_since(ramp_end).as_secs_f64();
    Ok(r)
}

fn run_job(socket: &Path, job: Job, args: &Args, size: u64, server_pid: u32) -> Result<Result1> {
    let runtime = args.runtime.unwrap_or(if args.quick { 3 } else { 10 });
    let mut client = connect(socket, args.queues)?;
    let mut queues = client.take_queues();
    if !job.all_queues {
        queues.truncate(1);
    }
    let n = queues.len() as u32;
    let ramp_end = Instant::now() + Duration::from_secs(args.ramp);
    let end = ramp_end + Duration::from_secs(runtime);
    let cpu0 = process::cpu_time(server_pid);
    let region_len = (size / u64::from(n)) / u64::from(job.block) * u64::from(job.block);
    let handles: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(i, q)| {
            let depth = (job.depth / n).max(1);
            let region = (i as u64 * region_len, region_len);
            let seed = 0x5eed_0000 + i as u64;
            std::thread::spawn(move || drive(q, job, depth, region, seed, ramp_end, end))
        })
        .collect();
    let mut total = Result1::default();
    let cpu_at_ramp = {
        std::thread::sleep(ramp_end.saturating_duration_since(Instant::now()));
        process::cpu_time(server_pid).or(cpu0)
    };
    for h in handles {
        let r = h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        total.ios += r.ios;
        total.bytes += r.bytes;
        total.secs = r.secs;
        total.lat_us.extend(r.lat_us);
    }
    if let (Some(a), Some(b)) = (cpu_at_ramp, process::cpu_time(server_pid)) {
        total.server_cpu = (b - a).as_secs_f64() / runtime as f64;
    }
    drop(client);
    Ok(total)
}

/// Connects, retrying for a while: blockd refuses a VM while the previous connection to the
/// volume is still being torn down (a volume serves one VM at a time).
fn connect(socket: &Path, queues: u16) -> Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Client::connect(socket, &client_config(queues)) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context(format!("vhost-user connect to {}", socket.display()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn fill_through(socket: &Path, size: u64, queues: u16) -> Result<f64> {
    let t = Instant::now();
    let mut client = connect(socket, queues)?;
    let qs = client.take_queues();
    let n = qs.len() as u64;
    let region = size / n;
    let handles: Vec<_> = qs
        .into_iter()
        .enumerate()
        .map(|(i, mut q)| {
            std::thread::spawn(move || -> Result<()> {
                let mut rng = Rng(0xf111 + i as u64);
                q.fill_slots(|b| rng.fill(b))?;
                let mut off = i as u64 * region;
                let end = off + region;
                while off < end || q.in_flight() > 0 {
                    while off < end && q.in_flight() < 8 {
                        let len = (end - off).min(1 << 20) as u32;
                        q.submit(
                            &BlkRequest::Write {
                                sector: off / 512,
                                len,
                            },
                            0,
                            false,
                        )?;
                        off += u64::from(len);
                    }
                    q.notify()?;
                    for c in q.wait(Duration::from_secs(60))? {
                        if c.status != Some(0) {
                            bail!("fill write failed: {:?}", c.status);
                        }
                    }
                }
                q.submit(&BlkRequest::Flush, 0, true)?;
                q.wait(Duration::from_secs(60))?;
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("fill thread panicked"))??;
    }
    Ok(size as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64())
}

fn wait_socket(child: &mut process::Child, socket: &Path, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        if let Some(st) = child.try_wait()? {
            bail!("server exited ({st})\n{}", process::tail(log, 20));
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not appear\n{}",
                socket.display(),
                process::tail(log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn spawn_logged(bin: &Path, args: &[String], log: &Path, name: &str) -> Result<process::Child> {
    let f = std::fs::File::create(log)?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f);
    process::Child::spawn(cmd, name)
}

fn blockd_cli(bin: &Path, data: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new(bin)
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "blockd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

struct Target {
    name: &'static str,
    results: Vec<(Job, Result1)>,
    note: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    process::install_signal_handlers()?;
    let size = args
        .size
        .unwrap_or(if args.quick { 256 << 20 } else { 2 << 30 });
    let jobs: Vec<Job> = JOBS
        .iter()
        .copied()
        .filter(|j| args.jobs.iter().any(|n| n == j.name))
        .collect();
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/var/tmp/vhost-compare-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let blockd = args
        .blockd
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/blockd"));
    eprintln!(
        "vhost-compare: {} MiB, {} queue(s), {} s per job (+{} s ramp), work dir {}",
        size >> 20,
        args.queues,
        args.runtime.unwrap_or(if args.quick { 3 } else { 10 }),
        args.ramp,
        dir.display()
    );
    let mut targets = Vec::new();

    if args.targets.iter().any(|t| t == "qsd") {
        let qsd = process::find_program(
            &args.qemu_storage_daemon,
            "qemu-storage-daemon",
            "install qemu-utils 10 (scripts/setup.sh)",
        )?;
        let raw = dir.join("raw.img");
        let t = Instant::now();
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&raw)?;
            let mut rng = Rng(0xabcdef);
            let mut buf = vec![0u8; 1 << 20];
            for _ in 0..size >> 20 {
                rng.fill(&mut buf);
                f.write_all(&buf)?;
            }
            f.sync_all()?;
        }
        eprintln!("raw.img written in {:.1} s", t.elapsed().as_secs_f64());
        let socket = dir.join("qsd.sock");
        let _ = std::fs::remove_file(&socket);
        let log = logs.join("qemu-storage-daemon.log");
        let qargs: Vec<String> = vec![
            "--blockdev".into(),
            format!(
                "driver=file,node-name=file0,filename={},cache.direct=on,aio=io_uring",
                raw.display()
            ),
            "--blockdev".into(),
            "driver=raw,node-name=disk,file=file0".into(),
            "--export".into(),
            format!(
                "type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues={}",
                socket.display(),
                args.queues
            ),
        ];
        let mut child = spawn_logged(&qsd, &qargs, &log, "qemu-storage-daemon")?;
        wait_socket(&mut child, &socket, &log)?;
        let mut results = Vec::new();
        for &j in &jobs {
            eprintln!("qemu-storage-daemon: {}", j.name);
            results.push((j, run_job(&socket, j, &args, size, child.pid())?));
        }
        child.terminate(Duration::from_secs(20))?;
        let _ = std::fs::remove_file(&raw);
        targets.push(Target {
            name: "qemu-storage-daemon",
            results,
            note: "aio=io_uring, cache.direct=on".into(),
        });
    }

    if args.targets.iter().any(|t| t == "blockd") {
        let data = dir.join("blockd");
        let _ = std::fs::remove_dir_all(&data);
        let log = logs.join("blockd.log");
        let mut bargs: Vec<String> = vec![
            "--data-dir".into(),
            data.display().to_string(),
            "serve".into(),
            "--metrics-addr".into(),
            String::new(),
        ];
        if let Some(text) = blockd_config(&args) {
            let config = logs.join("blockd.toml");
            std::fs::write(&config, text)?;
            bargs.push("--config".into());
            bargs.push(config.display().to_string());
        }
        let mut child = spawn_logged(&blockd, &bargs, &log, "blockd")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while blockd_cli(&blockd, &data, &["status"]).is_err() {
            if let Some(st) = child.try_wait()? {
                bail!("blockd exited ({st})\n{}", process::tail(&log, 20));
            }
            if Instant::now() > deadline {
                bail!("blockd did not start\n{}", process::tail(&log, 20));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        blockd_cli(
            &blockd,
            &data,
            &["volume", "create", "bench", "--size", &size.to_string()],
        )?;
        let socket = data.join("vhost/bench.sock");
        wait_socket(&mut child, &socket, &log)?;
        let mibs = fill_through(&socket, size, args.queues)?;
        eprintln!("blockd volume filled through vhost-user at {mibs:.0} MiB/s");
        let mut results = Vec::new();
        for &j in &jobs {
            eprintln!("blockd: {}", j.name);
            results.push((j, run_job(&socket, j, &args, size, child.pid())?));
        }
        let (st, killed) = child.terminate(Duration::from_secs(120))?;
        if killed || !st.success() {
            bail!(
                "blockd did not exit cleanly ({st})\n{}",
                process::tail(&log, 20)
            );
        }
        let _ = std::fs::remove_dir_all(&data);
        targets.push(Target {
            name: "blockd",
            results,
            note: format!("volume filled at {mibs:.0} MiB/s through vhost-user"),
        });
    }

    print_report(&targets, &jobs, size, &args);
    Ok(())
}

fn print_report(targets: &[Target], jobs: &[Job], size: u64, args: &Args) {
    println!(
        "\nvhost-user-blk, {} MiB disk, {} queue(s), same client (vhost_blk::client, EVENT_IDX)\n",
        size >> 20,
        args.queues
    );
    let mut header = "| job |".to_string();
    for t in targets {
        header.push_str(&format!(" {} |", t.name));
    }
    if targets.len() == 2 {
        header.push_str(" blockd / qsd |");
    }
    println!("{header}");
    println!(
        "|{}",
        "---|".repeat(targets.len() + 1 + usize::from(targets.len() == 2))
    );
    for (i, j) in jobs.iter().enumerate() {
        let seq = j.block > 4096;
        let value = |r: &Result1| if seq { r.mibs() } else { r.iops() };
        let mut row = format!("| {} |", j.name);
        for t in targets {
            let r = &t.results[i].1;
            if seq {
                row.push_str(&format!(" {:.0} MiB/s |", r.mibs()));
            } else {
                row.push_str(&format!(" {:.0} IOPS |", r.iops()));
            }
        }
        if targets.len() == 2 {
            let a = value(&targets[1].results[i].1);
            let b = value(&targets[0].results[i].1);
            row.push_str(&format!(" {:.2}x |", a / b));
        }
        println!("{row}");
        let mut lat = format!("| {} p50/p99 µs |", j.name);
        for t in targets {
            let r = &t.results[i].1;
            lat.push_str(&format!(" {} / {} |", r.pct(0.5), r.pct(0.99)));
        }
        if targets.len() == 2 {
            lat.push_str(" |");
        }
        println!("{lat}");
    }
    println!("\nserver CPU during each job (cores):\n");
    println!(
        "| job |{}",
        targets
            .iter()
            .map(|t| format!(" {} |", t.name))
            .collect::<String>()
    );
    println!("|{}", "---|".repeat(targets.len() + 1));
    for (i, j) in jobs.iter().enumerate() {
        let mut row = format!("| {} |", j.name);
        for t in targets {
            row.push_str(&format!(" {:.2} |", t.results[i].1.server_cpu));
        }
        println!("{row}");
    }
    for t in targets {
        println!("\n{}: {}", t.name, t.note);
    }
}
