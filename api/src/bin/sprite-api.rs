//! `sprite-api serve`: the user-facing API server. It embeds a sprite host (the manager, the
//! wake-on-request proxy with URL auth, sprited's control socket for operators), serves
//! `/v1` over HTTP, Prometheus `/metrics`, and replicates the control plane to the object
//! store. docs/api.md documents it.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "sprite-api", version, about = "The sprites API server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    Serve(Box<ServeArgs>),
    /// Print the OpenAPI document.
    Openapi,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// State directory: control plane (orgs/*.db), admin token, the sprite host (vmm/).
    #[arg(
        long,
        env = "SPRITES_API_DATA_DIR",
        default_value = "/var/lib/sprites/api"
    )]
    data_dir: PathBuf,
    /// HTTP address of the API.
    #[arg(long, default_value = "127.0.0.1:8400")]
    listen: String,
    /// Prometheus /metrics address ("" disables).
    #[arg(long, default_value = "127.0.0.1:9491")]
    metrics_addr: String,
    /// Where the control plane is replicated: file:///dir, s3://bucket/prefix, memory://,
    /// or "" for none (local only).
    #[arg(long, env = "SPRITES_CONTROL_STORE", default_value = "")]
    control_store: String,
    /// Seconds between replication passes (the RPO of the control plane).
    #[arg(long, default_value_t = 5)]
    replicate_secs: u64,
    /// Seconds between usage samples.
    #[arg(long, default_value_t = 30)]
    usage_secs: u64,
    /// The sprite host's state (records, images, VM run directories, sprited.sock).
    #[arg(long)]
    vmm_dir: Option<PathBuf>,
    /// Admin token (manages organizations). Default: <data-dir>/admin-token, created once.
    #[arg(long, env = "SPRITES_ADMIN_TOKEN")]
    admin_token: Option<String>,
    #[command(flatten)]
    vmm: vmm_glue::serve::VmmArgs,
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(async {
        match cli.cmd {
            Cmd::Openapi => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&api::server::openapi()).unwrap_or_default()
                );
                0
            }
            Cmd::Serve(a) => match serve(*a).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("sprite-api: {e:#}");
                    1
                }
            },
        }
    });
    std::process::exit(code);
}

fn admin_token(a: &ServeArgs) -> anyhow::Result<String> {
    if let Some(t) = &a.admin_token {
        return Ok(t.clone());
    }
    let p = a.data_dir.join("admin-token");
    if let Ok(t) = std::fs::read_to_string(&p) {
        return Ok(t.trim().to_string());
    }
    let mut b = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    let t = format!(
        "spradmin_{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    );
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&p)
        .with_context(|| format!("creating {}", p.display()))?;
    std::io::Write::write_all(&mut f, format!("{t}\n").as_bytes())?;
    Ok(t)
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    vmm_glue::serve::init_tracing("SPRITES_LOG");
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("creating {}", a.data_dir.display()))?;
    let token = admin_token(&a)?;
    let remote = if a.control_store.is_empty() {
        None
    } else {
        let cfg = chunkstore::remote::RemoteConfig {
            url: a.control_store.clone(),
            ..Default::default()
        };
        cfg.open()
            .with_context(|| format!("opening the control store {}", a.control_store))?
    };
    let cp = api::store::ControlPlane::open(&a.data_dir, remote)
        .await
        .context("opening the control plane")?;
    let vmm_dir = a.vmm_dir.clone().unwrap_or_else(|| a.data_dir.join("vmm"));
    let mut host =
        vmm_glue::serve::Host::start(&vmm_dir, &a.vmm, api::server::url_authorizer(cp.clone()))
            .await?;
    host.serve_control(&vmm_dir.join("sprited.sock")).await?;
    host.ensure_default_image()
        .await
        .context("building the base image")?;
    let metrics = Arc::new(api::metrics::ApiMetrics::default());
    {
        let met = metrics.clone();
        host.manager.set_wake_observer(Box::new(move |kind, took| {
            let op = match kind {
                vmm_glue::manager::Pause::Warm => "warm_wake",
                vmm_glue::manager::Pause::Cold => "cold_wake",
            };
            met.op(op, took);
        }));
    }
    let app = api::server::App {
        m: host.manager.clone(),
        cp: cp.clone(),
        admin_token: Arc::new(token),
        metrics: metrics.clone(),
    };
    let stop = host.stop.clone();
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    let addr = listener.local_addr()?;
    let router = api::server::router(app.clone());
    let s = stop.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await
    });
    if !a.metrics_addr.is_empty() {
        let l = tokio::net::TcpListener::bind(&a.metrics_addr)
            .await
            .with_context(|| format!("binding the metrics address {}", a.metrics_addr))?;
        let m = host.manager.clone();
        let met = metrics.clone();
        let r = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let m = m.clone();
                let met = met.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        met.encode(&m),
                    )
                }
            }),
        );
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(l, r)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await;
        });
    }
    tokio::spawn(api::usage::run_sampler(
        app.clone(),
        Duration::from_secs(a.usage_secs.max(1)),
        stop.clone(),
    ));
    let cpr = cp.clone();
    let every = Duration::from_secs(a.replicate_secs.max(1));
    let s = stop.clone();
    let replicator = tokio::spawn(async move {
        let mut iv = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = s.cancelled() => break,
                _ = iv.tick() => {}
            }
            if let Err(e) = cpr.replicate().await {
                tracing::warn!(%e, "control plane replication failed; retrying");
            }
        }
    });
    tracing::info!(%addr, proxy = ?host.manager.config().proxy_url, vmm = %host.manager.launcher_name(), "sprite-api ready");
    vmm_glue::serve::wait_for_signal().await?;
    host.shutdown().await;
    let _ = replicator.await;
    if let Err(e) = cp.replicate().await {
        tracing::warn!(%e, "final control plane replication failed");
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(())
}
