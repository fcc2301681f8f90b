//! Sprite lifecycle benchmark: the real `blockd` and `sprited` binaries (from the same target
//! directory as this one), QEMU (KVM if the probe works, else TCG), the base image.
//!
//! Measures, per sample: create-to-first-exec, warm wake (to first exec), checkpoint of a
//! running sprite, cold pause, cold wake (to first exec), restore-to-first-exec and
//! fork-to-first-exec, and for services (docs/services.md): creating an HTTP service through
//! the API, and a cold wake by a request to the sprite's URL until that service answers
//! (the runtime starts it at boot). Each is split into **storage** (blockd calls: clone, checkpoint,
//! restore, flush/sync) and **VMM/guest** (QEMU start, boot to the runtime answering,
//! freeze/thaw, pause/resume) as sprited reports them.
//!
//! `cargo run --release -p fio-benches --bin sprite-bench -- [--samples 3] [--accel auto]
//!   [--blockd-config FILE]` (a config with `object_store.cache_size = "1M"` makes cold
//!   wakes read the root volume back from the object store). Prints a Markdown table.

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmm_glue::client::Client;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 3)]
    samples: usize,
    /// kvm, tcg or auto.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Work directory (a fresh subdirectory is created and removed).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// blockd config file (e.g. a small object_store.cache_size).
    #[arg(long)]
    blockd_config: Option<PathBuf>,
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sibling(name: &str) -> Result<PathBuf> {
    let p = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join(name);
    if !p.exists() {
        bail!(
            "{} not found: cargo build --release -p blockd -p vmm-glue",
            p.display()
        );
    }
    Ok(p)
}

fn wait_for(p: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !p.exists() {
        if Instant::now() > deadline {
            bail!("{} did not appear", p.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[derive(Default)]
struct Samples(BTreeMap<&'static str, Vec<(f64, f64, f64)>>);

impl Samples {
    /// (total, storage, vmm) in ms.
    fn add(&mut self, what: &'static str, total: f64, t: &Value) {
        let storage = t["storage_ms"].as_f64().unwrap_or(0.0);
        let vmm = t["vmm_ms"].as_f64().unwrap_or(0.0);
        self.0.entry(what).or_default().push((total, storage, vmm));
    }
}

/// A plain HTTP GET through the proxy; returns the status.
fn http_get(port: u16, path: &str) -> Result<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(180)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status in the proxy's answer")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn exec_true(c: &Client, name: &str) -> Result<()> {
    let mut code = None;
    c.stream(
        "POST",
        &format!("/v1/sprites/{name}/exec"),
        Some(json!({"args": ["true"]})),
        |v| {
            if v["event"] == "exit" {
                code = v["code"].as_i64();
            }
        },
    )
    .await?;
    if code != Some(0) {
        bail!("exec in {name} did not exit 0");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let work = tempfile::Builder::new()
        .prefix("sprite-bench")
        .tempdir_in(&a.dir)?;
    let bd = work.path().join("blockd");
    let vm = work.path().join("vmm");
    let mut bc = Command::new(sibling("blockd")?);
    bc.arg("--data-dir")
        .arg(&bd)
        .args(["serve", "--metrics-addr", ""]);
    if let Some(cfg) = &a.blockd_config {
        bc.arg("--config").arg(cfg);
    }
    bc.stdout(Stdio::null())
        .stderr(std::fs::File::create(work.path().join("blockd.log"))?);
    let _blockd = Proc(bc.spawn().context("starting blockd")?);
    wait_for(&bd.join("admin.sock"))?;
    let proxy_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut sc = Command::new(sibling("sprited")?);
    sc.arg("--data-dir")
        .arg(&vm)
        .arg("serve")
        .arg("--blockd-socket")
        .arg(bd.join("admin.sock"))
        .args([
            "--proxy-addr",
            &format!("127.0.0.1:{proxy_port}"),
            "--idle-warm-secs",
            "0",
            "--min-mem-available-mib",
            "0",
        ])
        .args(["--accel", &a.accel])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.path().join("sprited.log"))?);
    let _sprited = Proc(sc.spawn().context("starting sprited")?);
    wait_for(&vm.join("sprited.sock"))?;
    let c = Client::new(&vm.join("sprited.sock"));

    let t = Instant::now();
    c.call(
        "POST",
        "/v1/images",
        Some(json!({"name": "base", "size_mib": 1024})),
    )
    .await?;
    eprintln!(
        "image built in {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );

    let mut s = Samples::default();
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    for i in 0..a.samples {
        let name = format!("b{i}");
        let sp = format!("/v1/sprites/{name}");
        let t0 = Instant::now();
        let v = c
            .call("POST", "/v1/sprites", Some(json!({"name": name})))
            .await?;
        exec_true(&c, &name).await?;
        s.add("create to first exec", ms(t0), &v["timings"]);

        c.call(
            "POST",
            &format!("{sp}/hibernate"),
            Some(json!({"mode": "warm"})),
        )
        .await?;
        let t0 = Instant::now();
        let v = c.call("POST", &format!("{sp}/wake"), None).await?;
        exec_true(&c, &name).await?;
        s.add("warm wake to first exec", ms(t0), &v["timings"]);

        let t0 = Instant::now();
        let ck = c
            .call("POST", &format!("{sp}/checkpoints"), Some(json!({})))
            .await?;
        s.add("checkpoint (running sprite)", ms(t0), &ck["timings"]);
        let ck_id = format!("v{}", ck["id"]);

        let t0 = Instant::now();
        let v = c
            .call(
                "POST",
                &format!("{sp}/hibernate"),
                Some(json!({"mode": "cold"})),
            )
            .await?;
        s.add("cold pause", ms(t0), &v["timings"]);
        let d = c.call("GET", &sp, None).await?;
        eprintln!(
            "before the cold wake: {} of the volume's {} head bytes are on the local disk",
            d["storage"]["local_bytes"], d["storage"]["head_bytes"]
        );
        let t0 = Instant::now();
        let v = c.call("POST", &format!("{sp}/wake"), None).await?;
        exec_true(&c, &name).await?;
        s.add("cold wake to first exec", ms(t0), &v["timings"]);

        let t0 = Instant::now();
        let v = c
            .call("POST", &format!("{sp}/checkpoints/{ck_id}/restore"), None)
            .await?;
        exec_true(&c, &name).await?;
        s.add("restore to first exec", ms(t0), &v["timings"]);

        let fork = format!("f{i}");
        let t0 = Instant::now();
        let v = c
            .call(
                "POST",
                &format!("{sp}/fork"),
                Some(json!({"checkpoint": ck_id, "name": fork})),
            )
            .await?;
        exec_true(&c, &fork).await?;
        s.add("fork to first exec", ms(t0), &v["timings"]);
        // Services: an HTTP service created through the API, then a cold wake by a request
        // to the sprite's URL, answered by that service.
        let t0 = Instant::now();
        c.call(
            "PUT",
            &format!("{sp}/services/web?duration=0"),
            Some(json!({"cmd": "httpd", "args": ["-f", "-p", "3000", "-h", "/etc"], "http_port": 3000})),
        )
        .await?;
        s.add("service create (duration=0)", ms(t0), &Value::Null);
        c.call(
            "POST",
            &format!("{sp}/hibernate"),
            Some(json!({"mode": "cold"})),
        )
        .await?;
        let t0 = Instant::now();
        let status = http_get(proxy_port, &format!("/s/{name}/hostname"))?;
        if status != 200 {
            bail!("the service answered {status} after a cold wake");
        }
        s.add(
            "cold wake by URL to the service's answer",
            ms(t0),
            &Value::Null,
        );
        for n in [&name, &fork] {
            c.call("DELETE", &format!("/v1/sprites/{n}"), None).await?;
        }
        eprintln!("sample {} done", i + 1);
    }

    let status = c.call("GET", "/v1/status", None).await?;
    println!(
        "sprite lifecycle, {} samples, VMM {} (medians, ms)\n",
        a.samples,
        status["vmm"].as_str().unwrap_or("?")
    );
    println!("| operation | total | storage (blockd) | VMM + guest | storage < 50 ms |");
    println!("|---|---:|---:|---:|:---:|");
    for (what, v) in &s.0 {
        let total = median(v.iter().map(|x| x.0).collect());
        let st = median(v.iter().map(|x| x.1).collect());
        let vmm = median(v.iter().map(|x| x.2).collect());
        println!(
            "| {what} | {total:.1} | {st:.1} | {vmm:.1} | {} |",
            if st < 50.0 { "yes" } else { "no" }
        );
    }
    Ok(())
}
