//! Object-tier benchmark (in-process engine, release build): what a host pays to open and
//! read a volume that lives in the object store, with a store that adds a fixed latency to
//! every request (default 20 ms, like a remote S3 region).
//!
//! 1. Engine A writes `--written` of random data (incompressible) into a `--size` volume
//!    and a second volume with `--small-written`, syncs both (no latency yet).
//! 2. Latency is switched on. Engine B, on an empty data dir, imports each volume: the cold
//!    open time (metadata only), for both amounts of data.
//! 3. On B: sequential 1 MiB reads at QD8 over the first `--seq` bytes, cold (every frame
//!    comes from the store) then warm (from the cache); random 4 KiB reads at QD32 over the
//!    rest of the written range, cold then warm. Reports throughput, latency and object-store
//!    requests / bytes per GiB read (from the engine's request metrics).
//!
//! `cargo run --release -p fio-benches --bin tier-bench -- [--latency-ms 20]`

use anyhow::{Context, Result, anyhow};
use blockd::objects::RemoteSetup;
use blockd::{Engine, EngineConfig};
use chunkstore::remote::{FaultConfig, FaultSettings, FaultyStore, Op, Remote};
use chunkstore::tier::TierConfig;
use clap::Parser;
use rand::{Rng, RngCore};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhost_blk::BlockDevice;

#[derive(Debug, Parser)]
struct Args {
    /// Work directory (fresh subdirectories are created and removed).
    #[arg(long, default_value = "/var/tmp")]
    dir: std::path::PathBuf,
    /// Logical size of the volumes.
    #[arg(long, default_value = "10G", value_parser = blockd::size::parse_size)]
    size: u64,
    /// Data written to the big volume.
    #[arg(long, default_value = "1G", value_parser = blockd::size::parse_size)]
    written: u64,
    /// Data written to the small volume (cold open must not depend on it).
    #[arg(long, default_value = "64M", value_parser = blockd::size::parse_size)]
    small_written: u64,
    /// Sequentially read range (from offset 0).
    #[arg(long, default_value = "256M", value_parser = blockd::size::parse_size)]
    seq: u64,
    /// Random 4 KiB reads per measurement.
    #[arg(long, default_value_t = 4000)]
    random_reads: usize,
    /// Latency added to every object-store request.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn engine(dir: &std::path::Path, store: Arc<dyn object_store::ObjectStore>) -> Result<Arc<Engine>> {
    let mut c = EngineConfig::new(dir);
    c.remote = Some(RemoteSetup {
        remote: Remote::new(store, "bench".into()),
        tier: TierConfig {
            cache_bytes: 8 << 30,
            ..Default::default()
        },
        lease_check: Duration::from_secs(3600),
    });
    Ok(Engine::open(c)?)
}

async fn fill(vol: &blockd::Volume, bytes: u64) -> Result<()> {
    let chunk = 1u64 << 20;
    let mut rng = rand::rng();
    let mut off = 0;
    while off < bytes {
        let mut b = vol.alloc_buf(chunk as usize);
        rng.fill_bytes(b.as_mut());
        vol.write(off, b, false)
            .await
            .map_err(|e| anyhow!("write at {off}: {e}"))?;
        off += chunk;
    }
    vol.flush().await.map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Requests (all kinds) and bytes read from the store so far.
fn store_counts(e: &Engine) -> (u64, u64) {
    let m = e.objects().map(|o| o.store_metrics.snapshot());
    m.map(|m| (m.requests_total(), m.bytes_in))
        .unwrap_or_default()
}

fn gets(e: &Engine) -> u64 {
    e.objects()
        .map(|o| {
            let s = o.store_metrics.snapshot();
            s.op(Op::Get).requests + s.op(Op::GetRange).requests
        })
        .unwrap_or(0)
}

struct ReadResult {
    secs: f64,
    bytes: u64,
    lat_us: Vec<f64>,
    gets: u64,
    bytes_in: u64,
}

/// Reads `offsets` (each `len` bytes) with `depth` in flight.
async fn read_all(
    e: &Arc<Engine>,
    vol: &Arc<blockd::Volume>,
    offsets: Vec<u64>,
    len: usize,
    depth: usize,
) -> Result<ReadResult> {
    let (g0, (_, in0)) = (gets(e), store_counts(e));
    let queue = Arc::new(parking_lot::Mutex::new(offsets.into_iter()));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..depth {
        let (queue, vol) = (queue.clone(), vol.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let Some(off) = queue.lock().next() else {
                    break;
                };
                let t = Instant::now();
                vol.read(off, len)
                    .await
                    .map_err(|e| anyhow!("read at {off}: {e}"))?;
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut lat_us = Vec::new();
    for t in tasks {
        lat_us.extend(t.await??);
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(ReadResult {
        secs,
        bytes: lat_us.len() as u64 * len as u64,
        lat_us,
        gets: gets(e) - g0,
        bytes_in: store_counts(e).1 - in0,
    })
}

fn row(name: &str, r: &mut ReadResult, per_op: &str) {
    let gib = r.bytes as f64 / (1u64 << 30) as f64;
    let rate = if per_op == "MiB/s" {
        format!("{:.0} MiB/s", r.bytes as f64 / (1 << 20) as f64 / r.secs)
    } else {
        format!("{:.0} IOPS", r.lat_us.len() as f64 / r.secs)
    };
    let (p50, p99) = (pct(&mut r.lat_us, 0.5), pct(&mut r.lat_us, 0.99));
    println!(
        "| {name} | {rate} | {p50:.0} / {p99:.0} | {} | {:.0} | {:.0} MiB |",
        r.gets,
        r.gets as f64 / gib,
        r.bytes_in as f64 / (1 << 20) as f64 / gib,
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let work = tempfile::Builder::new()
        .prefix("tier-bench-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("work dir in {}", args.dir.display()))?;
    let faults = FaultConfig::seeded(FaultSettings::default(), 1);
    let store: Arc<dyn object_store::ObjectStore> = Arc::new(FaultyStore::new(
        object_store::memory::InMemory::new(),
        faults.clone(),
    ));
    let fmt = blockd::size::format_size;

    // 1. Host A writes and syncs.
    let a = engine(&work.path().join("a"), store.clone())?;
    for (name, written) in [("big", args.written), ("small", args.small_written)] {
        a.create_volume_claimed(name, args.size).await?;
        let t = Instant::now();
        fill(&*a.volume(name)?, written).await?;
        let w = t.elapsed().as_secs_f64();
        let t = Instant::now();
        a.sync_volume(name).await?;
        eprintln!(
            "host A: {name}: {} written at {:.0} MiB/s, synced in {:.1} s",
            fmt(written),
            written as f64 / (1 << 20) as f64 / w,
            t.elapsed().as_secs_f64()
        );
    }
    let (req, _) = store_counts(&a);
    drop(a);

    // 2. Latency on; host B opens both volumes cold.
    faults.set(FaultSettings {
        latency: Duration::from_millis(args.latency_ms),
        ..Default::default()
    });
    let b = engine(&work.path().join("b"), store.clone())?;
    println!(
        "## Object tier, {} ms per object-store request (in-memory store + injected latency)\n",
        args.latency_ms
    );
    println!("Host A made {req} object-store requests to write and sync both volumes.\n");
    println!("| cold open (`volume import`) | written | time | map pages | metadata bytes |");
    println!("|---|---|---|---|---|");
    for (name, written) in [("small", args.small_written), ("big", args.written)] {
        let t = Instant::now();
        let rep = b.import_volume(name, None, true).await?;
        println!(
            "| {} volume, {name} | {} | {:.0} ms | {} | {} |",
            fmt(args.size),
            fmt(written),
            t.elapsed().as_secs_f64() * 1e3,
            rep.pages,
            fmt(rep.metadata_bytes)
        );
    }
    println!();

    // 3. Reads on B.
    let vol = b.volume("big")?;
    let seq: Vec<u64> = (0..args.seq.min(args.written) >> 20)
        .map(|i| i << 20)
        .collect();
    let mut rng = rand::rng();
    let lo = args.seq.min(args.written) >> 12;
    let hi = args.written >> 12;
    if hi <= lo {
        return Err(anyhow!("--written must exceed --seq for the random reads"));
    }
    let rand_offs: Vec<u64> = (0..args.random_reads)
        .map(|_| rng.random_range(lo..hi) << 12)
        .collect();
    println!(
        "| read | throughput | latency p50 / p99 (µs) | GET requests | GETs per GiB | fetched per GiB read |"
    );
    println!("|---|---|---|---|---|---|");
    let mut r = read_all(&b, &vol, seq.clone(), 1 << 20, 8).await?;
    row("seq 1M QD8, cold", &mut r, "MiB/s");
    let mut r = read_all(&b, &vol, seq, 1 << 20, 8).await?;
    row("seq 1M QD8, warm", &mut r, "MiB/s");
    let mut r = read_all(&b, &vol, rand_offs.clone(), 4096, 32).await?;
    row("rand 4K QD32, cold", &mut r, "IOPS");
    let mut r = read_all(&b, &vol, rand_offs, 4096, 32).await?;
    row("rand 4K QD32, warm", &mut r, "IOPS");
    Ok(())
}
