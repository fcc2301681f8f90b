//! Running a sprite host: the flags ([`VmmArgs`]), the manager with its housekeeping, the
//! wake-on-request proxy and the control socket. `sprited serve` and the API server both
//! run one.

use crate::manager::{Manager, ManagerConfig, Settings};
use anyhow::Context;
use clap::Args;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Flags of a sprite host (`sprited serve`, and the API server which embeds one).
#[derive(Args, Debug, Clone)]
pub struct VmmArgs {
    /// blockd's admin socket.
    #[arg(
        long,
        env = "BLOCKD_ADMIN_SOCKET",
        default_value = "/var/lib/sprites/blockd/admin.sock"
    )]
    pub blockd_socket: PathBuf,
    /// Wake-on-request HTTP proxy ("" to disable).
    #[arg(long, default_value = "127.0.0.1:8480")]
    pub proxy_addr: String,
    /// Sprite URLs are http://<name>.<domain>:<port>/ (and /s/<name>/ on the proxy).
    #[arg(long, default_value = "sprites.localhost")]
    pub domain: String,
    /// kvm, tcg or auto (probe KVM with a timeout, fall back to TCG).
    #[arg(long, env = "SPRITED_ACCEL", default_value = "auto")]
    pub accel: String,
    /// Where the KVM probe's answer is cached (default <data-dir>/accel; delete to probe again).
    #[arg(long)]
    pub accel_cache: Option<PathBuf>,
    /// Image new sprites use unless told otherwise.
    #[arg(long, default_value = "base")]
    pub image: String,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    #[arg(long, default_value_t = 512)]
    pub memory_mib: u64,
    #[arg(long, default_value_t = 30)]
    pub idle_warm_secs: u64,
    #[arg(long, default_value_t = 600)]
    pub idle_cold_secs: u64,
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// Longest a boot may take until the guest runtime answers.
    #[arg(long, default_value_t = 120)]
    pub boot_timeout_secs: u64,
    /// Longest the guest runtime may take to answer a request.
    #[arg(long, default_value_t = 20)]
    pub agent_timeout_secs: u64,
    /// Warm-paused sprites go cold while MemAvailable is below this many MiB (0: off).
    #[arg(long, default_value_t = 1024)]
    pub min_mem_available_mib: u64,
    /// Boot a sprite again when its VMM dies (else it goes to `error` until the next request).
    #[arg(long)]
    pub restart_on_crash: bool,
    /// sprite-agent binary put into images (default: next to this binary).
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
}

impl VmmArgs {
    /// No URL auth on the proxy (`sprited` alone: a local operator tool).
    pub fn proxy_authorizer_none(&self) -> crate::proxy::Authorize {
        Arc::new(|_, _| Ok(()))
    }
}

pub fn init_tracing(env: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(env)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// A running sprite host.
#[derive(Debug)]
pub struct Host {
    pub manager: Arc<Manager>,
    pub stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl Host {
    /// Opens the manager (asks blockd where its sockets are), starts housekeeping and the
    /// proxy (with `authorize` deciding who reaches which sprite).
    pub async fn start(
        data_dir: &Path,
        a: &VmmArgs,
        authorize: crate::proxy::Authorize,
    ) -> anyhow::Result<Host> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let agent_bin = match &a.agent_bin {
            Some(p) => p.clone(),
            None => std::env::current_exe()?
                .parent()
                .map(|d| d.join("sprite-agent"))
                .unwrap_or_default(),
        };
        let proxy: Option<SocketAddr> = if a.proxy_addr.is_empty() {
            None
        } else {
            Some(a.proxy_addr.parse().context("--proxy-addr")?)
        };
        let proxy_listener = match proxy {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the proxy on {addr}"))?,
            ),
            None => None,
        };
        let proxy_url = proxy_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| format!("http://{a}"));
        let cfg = ManagerConfig {
            data_dir: data_dir.to_path_buf(),
            blockd_socket: a.blockd_socket.clone(),
            default_image: a.image.clone(),
            defaults: Settings {
                vcpus: a.vcpus,
                memory_mib: a.memory_mib,
                idle_warm_secs: a.idle_warm_secs,
                idle_cold_secs: a.idle_cold_secs,
                http_port: a.http_port,
            },
            domain: a.domain.clone(),
            proxy_url,
            boot_timeout: Duration::from_secs(a.boot_timeout_secs),
            agent_timeout: Duration::from_secs(a.agent_timeout_secs),
            min_mem_available_mib: a.min_mem_available_mib,
            restart_on_crash: a.restart_on_crash,
            agent_bin,
        };
        let cache: PathBuf = a
            .accel_cache
            .clone()
            .unwrap_or_else(|| data_dir.join("accel"));
        let launcher = crate::vm::QemuLauncher::new(&a.accel, &cache).await?;
        let manager = Manager::open(cfg, Arc::new(launcher)).await?;
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(manager.clone().run_housekeeping(stop.clone()));
        if let Some(l) = proxy_listener {
            tasks.spawn(crate::proxy::serve_with(
                manager.clone(),
                l,
                stop.clone(),
                authorize,
            ));
        }
        Ok(Host {
            manager,
            stop,
            tasks,
        })
    }

    /// Serves the control API (docs/sprites.md) on a unix socket (mode 0600).
    pub async fn serve_control(&mut self, socket: &Path) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket)
            .with_context(|| format!("binding {}", socket.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
        }
        let app = crate::server::router(self.manager.clone());
        let s = self.stop.clone();
        self.tasks.spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await;
        });
        Ok(())
    }

    /// Builds the default image if it does not exist yet.
    pub async fn ensure_default_image(&self) -> anyhow::Result<()> {
        let cfg = self.manager.config();
        let dir = crate::manager::images_dir(&cfg.data_dir);
        if crate::image::load(&dir, &cfg.default_image).is_ok() {
            return Ok(());
        }
        tracing::info!(image = %cfg.default_image, "building the base image");
        crate::image::build(
            self.manager.blockd(),
            self.manager.nbd_socket(),
            &dir,
            &cfg.default_image,
            1024,
            &cfg.agent_bin,
        )
        .await
        .map(|_| ())
    }

    /// Stops everything: sprites are paused cold first.
    pub async fn shutdown(mut self) {
        tracing::info!("shutting down: pausing sprites cold");
        self.stop.cancel();
        self.manager.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
    }
}
