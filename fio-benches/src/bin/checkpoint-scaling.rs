//! Checkpoint scaling benchmark (in-process, inside the engine, release build):
//!
//! 1. checkpoint create and restore latency on a volume with a little data written (64 MiB)
//!    versus a lot (8 GiB): O(1) operations should cost the same;
//! 2. 4 KiB random read latency (QD1) after 0 versus 1000 checkpoints (with writes between
//!    them, so every block has many versions).
//!
//! `cargo run --release -p fio-benches --bin checkpoint-scaling -- [--big 8G] [--dir DIR]`
//! Prints a Markdown table. Timings are the daemon-internal metadata commit
//! (`duration_us`), which is what `blockd_admin_duration_seconds` reports, plus the
//! end-to-end call (which adds the flushes a checkpoint does before and after).

use anyhow::{Context, Result};
use blockd::{Engine, EngineConfig};
use clap::Parser;
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhost_blk::BlockDevice;

#[derive(Debug, Parser)]
struct Args {
    /// Work directory (a fresh subdirectory is created and removed).
    #[arg(long, default_value = "/var/tmp")]
    dir: std::path::PathBuf,
    /// Data written to the small volume.
    #[arg(long, default_value = "64M", value_parser = blockd::size::parse_size)]
    small: u64,
    /// Data written to the big volume.
    #[arg(long, default_value = "8G", value_parser = blockd::size::parse_size)]
    big: u64,
    /// Checkpoint/restore samples per volume.
    #[arg(long, default_value_t = 50)]
    samples: usize,
    /// Data written to the read-latency volume.
    #[arg(long, default_value = "256M", value_parser = blockd::size::parse_size)]
    read_volume: u64,
    /// Checkpoints created between the two read measurements.
    #[arg(long, default_value_t = 1000)]
    checkpoints: usize,
    /// Random reads per measurement.
    #[arg(long, default_value_t = 20000)]
    reads: usize,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

async fn fill(vol: &blockd::Volume, bytes: u64, seed: u8) -> Result<()> {
    let chunk = 1u64 << 20;
    let mut off = 0;
    while off < bytes {
        let mut b = vol.alloc_buf(chunk as usize);
        for (i, x) in b.as_mut().iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(31).wrapping_add(seed) | 1;
        }
        vol.write(off, b, false)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        off += chunk;
    }
    vol.flush().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

struct Lat {
    internal_us: Vec<f64>,
    total_us: Vec<f64>,
}

async fn checkpoint_and_restore(
    engine: &Arc<Engine>,
    name: &str,
    samples: usize,
) -> Result<(Lat, Lat)> {
    let vol = engine.volume(name)?;
    let mut create = Lat {
        internal_us: vec![],
        total_us: vec![],
    };
    let mut restore = Lat {
        internal_us: vec![],
        total_us: vec![],
    };
    for i in 0..samples {
        // A small write between checkpoints, so each one has something of its own.
        let mut b = vol.alloc_buf(4096);
        b.as_mut().fill(i as u8 | 1);
        vol.write((i as u64 * 4096) % (1 << 20), b, false)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let t = Instant::now();
        let cp = engine.create_checkpoint(name, "bench").await?;
        create.total_us.push(t.elapsed().as_secs_f64() * 1e6);
        create.internal_us.push(cp.duration_us as f64);
        let t = Instant::now();
        let r = engine.restore_checkpoint(name, cp.value.id, false).await?;
        restore.total_us.push(t.elapsed().as_secs_f64() * 1e6);
        restore.internal_us.push(r.duration_us as f64);
    }
    Ok((create, restore))
}

async fn read_latency(vol: &blockd::Volume, bytes: u64, n: usize) -> Result<Vec<f64>> {
    let blocks = bytes / 4096;
    let mut rng = rand::rng();
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n / 10 {
        let b = rng.random_range(0..blocks);
        vol.read(b * 4096, 4096)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    for _ in 0..n {
        let b = rng.random_range(0..blocks);
        let t = Instant::now();
        vol.read(b * 4096, 4096)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(lat)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let work = tempfile::Builder::new()
        .prefix("checkpoint-scaling-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a work dir in {}", args.dir.display()))?;
    let engine = Engine::open(EngineConfig::new(&work.path().join("blockd")))?;
    let fmt = blockd::size::format_size;

    eprintln!("writing {} and {} ...", fmt(args.small), fmt(args.big));
    engine.create_volume("small", args.small.max(1 << 20))?;
    engine.create_volume("big", args.big.max(1 << 20))?;
    fill(&*engine.volume("small")?, args.small, 1).await?;
    let t = Instant::now();
    fill(&*engine.volume("big")?, args.big, 2).await?;
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "  big volume written at {:.0} MiB/s",
        args.big as f64 / secs / (1 << 20) as f64
    );

    println!(
        "## Checkpoint create / restore latency ({} samples each)\n",
        args.samples
    );
    println!(
        "| volume | written | create p50 (µs, in daemon) | create p99 | restore p50 (µs, in daemon) | restore p99 | create end-to-end p50 (µs, incl. flushes) | restore end-to-end p50 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, bytes) in [("small", args.small), ("big", args.big)] {
        let (mut c, mut r) = checkpoint_and_restore(&engine, name, args.samples).await?;
        println!(
            "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            fmt(bytes),
            pct(&mut c.internal_us, 0.5),
            pct(&mut c.internal_us, 0.99),
            pct(&mut r.internal_us, 0.5),
            pct(&mut r.internal_us, 0.99),
            pct(&mut c.total_us, 0.5),
            pct(&mut r.total_us, 0.5),
        );
    }

    eprintln!("read latency: writing {} ...", fmt(args.read_volume));
    engine.create_volume("reads", args.read_volume)?;
    let vol = engine.volume("reads")?;
    fill(&vol, args.read_volume, 3).await?;
    let mut before = read_latency(&vol, args.read_volume, args.reads).await?;
    eprintln!(
        "creating {} checkpoints with writes between them ...",
        args.checkpoints
    );
    let mut rng = rand::rng();
    let blocks = args.read_volume / 4096;
    for i in 0..args.checkpoints {
        for _ in 0..16 {
            let mut b = vol.alloc_buf(4096);
            b.as_mut().fill((i % 250) as u8 + 1);
            vol.write(rng.random_range(0..blocks) * 4096, b, false)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        engine.create_checkpoint("reads", "").await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut after = read_latency(&vol, args.read_volume, args.reads).await?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (mb, ma) = (mean(&before), mean(&after));
    let (p50b, p50a) = (pct(&mut before, 0.5), pct(&mut after, 0.5));
    let (p99b, p99a) = (pct(&mut before, 0.99), pct(&mut after, 0.99));
    println!(
        "\n## 4 KiB random read latency, QD1, in the engine ({} reads)\n",
        args.reads
    );
    println!("| checkpoints | p50 (µs) | p99 (µs) | mean (µs) |");
    println!("|---|---|---|---|");
    println!("| 0 | {p50b:.1} | {p99b:.1} | {mb:.1} |");
    println!("| {} | {p50a:.1} | {p99a:.1} | {ma:.1} |", args.checkpoints);
    println!(
        "| ratio | {:.2}x | {:.2}x | {:.2}x |",
        p50a / p50b,
        p99a / p99b,
        ma / mb
    );
    engine.shutdown().await?;
    Ok(())
}
